"""Sensors and schedules for refreshing studies."""
