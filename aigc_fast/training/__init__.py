"""The application: the DCGAN trainer and its tools, built on the library in :mod:`aigc_fast`.

``python -m aigc_fast.train`` (:mod:`.train`: the command; :mod:`.options`: its flags and the run's
settings; :mod:`.backends`: the step and what runs it; :mod:`.run`: set-up and resume; :mod:`.loop`:
the loop; :mod:`.outputs`: what a run writes), and the tools ``python -m aigc_fast.sample``,
``aigc_fast.eval`` and ``aigc_fast.curves``. Imports point one way: this package uses the library
(:mod:`aigc_fast.models`, :mod:`aigc_fast.nn`, :mod:`aigc_fast.functional`); the library never
imports it.
"""
