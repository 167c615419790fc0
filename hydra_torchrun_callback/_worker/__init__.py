"""Runs inside each worker: re-enter the Hydra job, run the task, hand back its value
(:func:`.entry.run_worker`, torch's entrypoint); arm stack dumps; claim a failure.
"""
