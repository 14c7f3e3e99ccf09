"""A program that does nothing but wait to be interrupted (``cli_main``'s signal contract, in a child).

``python -m tests.apps.interruptible --out DIR`` takes the run folder, says ``ready`` on stderr and
sleeps; an interrupt must end it with exit code 130 and the resume hint.
"""
import dataclasses
import sys
import time

from applications.common.run_folder import LoggingConfig, Program, cli_main


@dataclasses.dataclass
class Config:
    seed: int = 0
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


PROGRAM = Program(module="tests.apps.interruptible", config_cls=Config, description="waits", default_config=None,
                  default_out=lambda cfg: "unused")


def _body(run):
    run.start()
    run.say("ready")
    time.sleep(120)
    return {}


if __name__ == "__main__":
    sys.exit(cli_main(PROGRAM, _body))
