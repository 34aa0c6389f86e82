"""``tests.log`` as clickhouse-driver's tests use it: one root handler at a level."""

import logging


def configure(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-8s %(name)s: %(message)s", force=True
    )
