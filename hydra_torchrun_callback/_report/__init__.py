"""Reading what a job left: the job summary, stack dumps and frames. The command that
shows them, ``hydra-torchrun-summary``, is the public module ``hydra_torchrun_callback.summary``.
"""
