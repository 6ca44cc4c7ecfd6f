"""Sensors and schedules for refreshing studies: survey waves (survey_waves.py), the monthly
imagery refresh (schedules.py) and run-failure alerts (run_failures.py); assets/definitions.py
wires them to the study job."""
