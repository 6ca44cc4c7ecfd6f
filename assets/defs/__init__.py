"""The deployment's studies: one folder per study, each with a defs.yaml (assets.components.StudyComponent)."""
