"""Notices libraries log when they are imported that say nothing a user can act on, dropped at the loggers that
log them. Each entry point calls `quiet_library_notices()` before it imports those libraries: the `finetune`
commands (`setup_logging`), `scripts/setup.sh`'s check and the benchmarks (`benchmarks/common.py`)."""

from __future__ import annotations

import logging

# Logger name -> fragments of the messages dropped from it.
NOTICES = {
    # On CPUs with AVX512-bf16, importing bitsandbytes (which peft does, even for runs that quantize nothing) looks
    # for an optional hub kernel package and warns "Failed to load CPU gemm_4bit_forward from kernels-community"
    # when it is not installed; the kit trains without it (its 4-bit kernels are bitsandbytes' own).
    "bitsandbytes.backends.cpu.ops": ("kernels-community",),
    # DeepSpeed announces the CPU accelerator in every process.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # gguf's writer narrates the file it writes (endianness, the file's name and size); `finetune export` reports it.
    "gguf.gguf_writer": ("This GGUF file is for", "Writing the following files", "n_tensors = "),
}


class DropMessages(logging.Filter):
    """Drops the records whose message contains one of `fragments`."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_library_notices() -> None:
    """Filter `NOTICES` at their loggers (once per process; calling again adds nothing). A filter on the logger
    itself holds whatever handlers the library or the program adds, and Python's last-resort printer too."""
    for name, fragments in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(*fragments))
