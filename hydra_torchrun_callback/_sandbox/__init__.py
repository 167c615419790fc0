"""The parts of :mod:`hydra_torchrun_callback.slurm_sandbox`, which puts them together.

- :mod:`.files`: where each file of a sandbox lives, and the configuration it writes
  (hosts, munge key, fake GPUs, init.sql, slurmdbd.conf, gres.conf, slurm.conf).
- :mod:`.processes`: the daemons' processes (start, wait until ready, stop by PID) and
  the sandbox's teardown (cancel jobs, stop daemons, kill left-over job steps).
- :mod:`.daemons`: which daemons start, with which arguments, in which order: munged,
  MariaDB and slurmdbd (with a cached data dir), slurmctld, one slurmd per node.
"""
