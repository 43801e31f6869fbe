"""common/step_timing.py under its old name, for the scripts still at experiments/ top level. This file
goes when they move into a group."""
from common.step_timing import decode_step_program, interleaved_step_seconds, prepare_runs, temporaries_mib, time_runs  # noqa: F401
