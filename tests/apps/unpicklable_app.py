"""Test app whose task captures a lock: it cannot be sent to spawned workers."""

import os
import threading

import hydra

LOCK = threading.Lock()


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: object) -> int:
    with LOCK, open(os.path.join(os.getcwd(), f"ran_in_{os.getpid()}"), "w"):
        pass
    return 1


if __name__ == "__main__":
    main()
