"""The application: the DCGAN trainer and its tools, built on the library in :mod:`aigc_fast`.

``python -m aigc_fast.train`` is :mod:`.train` (the command), :mod:`.options` (its flags and the
run's settings), :mod:`.backends` (the step and what runs it), :mod:`.run` (set-up, resume,
checkpoints), :mod:`.loop` (the loop) and :mod:`.report` (metrics rows, samples, SWD rows);
``python -m aigc_fast.sample``, ``aigc_fast.eval`` and ``aigc_fast.curves`` are :mod:`.sample`,
:mod:`.eval` and :mod:`.curves`. Imports point one way: this package uses the library
(:mod:`aigc_fast.models`, :mod:`aigc_fast.nn`, :mod:`aigc_fast.functional`); the library never
imports it.
"""
