"""Everything that crosses a process or a host: the names (:mod:`.protocol`), the signed
job store (:mod:`.store`), pickling (:mod:`.pickling`), the agent pipe (:mod:`.pipe`) and
the workers' record files (:mod:`.records`).
"""
