"""Test app without an `if __name__ == "__main__":` guard (spawn must not re-run it)."""

import os

import hydra


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: object) -> str:
    return f"rank {os.environ['RANK']}"


main()
