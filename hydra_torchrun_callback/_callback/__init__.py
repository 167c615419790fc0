"""Runs in the Hydra process: the callback's hooks, the drop-in launcher, the per-node
config overrides, the diverted task call and the Hydra side of the agent pipe.

Imports nothing heavy: Hydra imports the plugin (and so this package) at every app start.
"""
