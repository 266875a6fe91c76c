"""DR19 error calibration (``errors``) and result flags (``flags``)."""
from catalogbuilder.calibrate.errors import calibrate_errors, calibration_relations
from catalogbuilder.calibrate.flags import FlagThresholds, apply_flags, flag_bad, flag_warn, result_flags

__all__ = ["FlagThresholds", "apply_flags", "calibrate_errors", "calibration_relations", "flag_bad", "flag_warn", "result_flags"]
