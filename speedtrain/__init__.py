"""speedtrain: plan and run fast Ultralytics YOLO training for the machine you are on.

    import speedtrain
    report = speedtrain.train("datasets/mine", epochs=30)   # a SpeedReport; shows itself in Jupyter
    report.metric("mAP50-95"), report.images_per_s

The functions are speedtrain.api's; their keyword names are the CLI's. Errors are SpeedtrainError subclasses.
Importing speedtrain does not import Ultralytics or torch (the calls that train, tune or validate do).
"""

__version__ = "0.1.0"

from speedtrain.api import check, compare, plan, prepare, probe, report, resume, train, tune  # noqa: E402
from speedtrain.errors import SpeedtrainError  # noqa: E402
from speedtrain.records import Hooks, StageProgress  # noqa: E402
from speedtrain.speedreport import SpeedReport  # noqa: E402

__all__ = [
    "Hooks",
    "SpeedReport",
    "StageProgress",
    "SpeedtrainError",
    "check",
    "compare",
    "plan",
    "prepare",
    "probe",
    "report",
    "resume",
    "train",
    "tune",
]
