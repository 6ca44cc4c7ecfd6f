"""The study contract (DESIGN §5): ``study.yaml`` loaded and validated with pydantic.

Paths in a study file are relative to the study file and may not escape its folder.
Column names are the user's; :class:`SurveySpec` maps them to the canonical names used
everywhere downstream (see :mod:`eocausal.survey`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ESTIMATORS = ("difference_in_means", "ipw", "aipw", "dml")
FEATURE_SETS = ("none", "tabular", "image", "tabular+image")

# Study names become file names and warehouse values: keep them to a safe alphabet.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StudyError(ValueError):
    """A study file that does not follow the contract."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SurveySpec(_Strict):
    path: str
    unit_id: str
    lat: str
    lon: str
    treatment: str
    outcome: str
    covariates: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct_columns(self) -> "SurveySpec":
        cols = [self.unit_id, self.lat, self.lon, self.treatment, self.outcome, *self.covariates]
        dupes = sorted({c for c in cols if cols.count(c) > 1})
        if dupes:
            raise ValueError(f"survey columns must be distinct; used more than once: {dupes}")
        return self


class ImagerySpec(_Strict):
    source: Literal["geotiff", "earthengine"] = "geotiff"
    path: str | None = None
    chip_size_px: int = Field(64, ge=8, le=1024)
    # A unit whose chip has more than this share of nodata pixels is excluded (with a record).
    max_nodata_share: float = Field(0.2, ge=0.0, lt=1.0)
    # The chip-usability check fails (and blocks estimation) below this share of usable units.
    min_usable_share: float = Field(0.5, gt=0.0, le=1.0)
    # Overrides the file's nodata value; None means "declared value, else detect zero borders".
    nodata: float | None = None
    bands: list[int] | None = None  # 1-based band indexes; None = all bands

    @model_validator(mode="after")
    def _path_for_geotiff(self) -> "ImagerySpec":
        if self.source == "geotiff" and not self.path:
            raise ValueError("imagery.path is required when imagery.source is 'geotiff'")
        return self


class EmbeddingSpec(_Strict):
    method: Literal["rcf", "backbone"] = "rcf"
    n_features: int = Field(1024, ge=8, le=65536)
    seed: int = 0
    patch_size: int = Field(3, ge=1, le=15)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(64, ge=1)


class AnalysisSpec(_Strict):
    estimators: list[Literal["difference_in_means", "ipw", "aipw", "dml"]] = Field(
        default_factory=lambda: list(ESTIMATORS)
    )
    feature_sets: list[Literal["none", "tabular", "image", "tabular+image"]] = Field(
        default_factory=lambda: list(FEATURE_SETS)
    )
    folds: int = Field(5, ge=2, le=50)
    seed: int = 0
    # Propensity scores are clipped to [clip, 1 - clip]; the clipped share is reported.
    propensity_clip: float = Field(0.01, gt=0.0, lt=0.5)
    # Image embeddings are reduced to this many principal components inside each fold.
    image_components: int = Field(64, ge=1)
    # Spatially blocked folds: units are grouped into square blocks of this size (km).
    spatial_block_km: float | None = Field(None, gt=0)

    @field_validator("estimators", "feature_sets")
    @classmethod
    def _non_empty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one")
        if len(set(v)) != len(v):
            raise ValueError(f"names repeated: {v}")
        return v


class Study(_Strict):
    name: str
    survey: SurveySpec
    imagery: ImagerySpec
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    # The folder holding study.yaml; set by load_study, not by the file.
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v

    @model_validator(mode="after")
    def _tabular_needs_covariates(self) -> "Study":
        wants_tabular = any(fs in ("tabular", "tabular+image") for fs in self.analysis.feature_sets)
        if wants_tabular and not self.survey.covariates:
            raise ValueError(
                "analysis.feature_sets asks for 'tabular' features but survey.covariates is empty"
            )
        return self

    def resolve(self, relative: str) -> Path:
        """A path from the study file, resolved inside the study folder (never outside it)."""
        root = self.root.resolve()
        p = (root / relative).resolve()
        if p != root and root not in p.parents:
            raise StudyError(f"path {relative!r} escapes the study folder {root}")
        return p

    @property
    def survey_path(self) -> Path:
        return self.resolve(self.survey.path)

    @property
    def imagery_path(self) -> Path:
        if self.imagery.path is None:
            raise StudyError("imagery.path is not set")
        return self.resolve(self.imagery.path)

    def spec_hash(self, *parts: str) -> str:
        """A stable hash of parts of the spec (e.g. 'analysis'), for versioning."""
        dumped = self.model_dump(mode="json", include=set(parts) if parts else None)
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; errors name the field and the rule."""
    path = Path(path)
    if path.is_dir():
        path = path / "study.yaml"
    if not path.exists():
        raise StudyError(f"study file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping at the top level")
    try:
        study = Study.model_validate({**raw, "root": path.parent.resolve()})
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        ]
        raise StudyError(f"{path}: invalid study file\n" + "\n".join(lines)) from None
    # Validate paths now, so a study cannot point outside its folder.
    study.survey_path
    if study.imagery.path is not None:
        study.imagery_path
    return study


def default_workdir(study_path: str | Path) -> Path:
    """Where a study's lake, cache and warehouse live unless told otherwise: beside the study file."""
    path = Path(study_path)
    folder = path if path.is_dir() else path.parent
    return folder.resolve() / "eocausal_work"
