"""What a node runs for one Hydra job: its placement, the torch elastic agent (in a fork
of the warm server, or in the Hydra process), the job store's coordinator, the records
and stacks of its workers. Entry point: :func:`.job.run_node`.
"""
