"""Sensors and schedules for refreshing studies: survey waves (survey_waves.py), the monthly
imagery refresh (schedules.py) and run-failure alerts (run_failures.py); assets/studies.py wires
one of each to every study's job, named after the study (<safe study>__survey_wave_sensor, ...)."""
