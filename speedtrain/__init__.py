"""speedtrain: plan and run fast Ultralytics YOLO training for the machine you are on."""

__version__ = "0.1.0"
