"""The study contract (DESIGN §5): ``study.yaml`` loaded and validated with pydantic.

Paths in a study file are relative to the study file and may not escape its folder.
Column names are the user's; :class:`SurveySpec` maps them to the canonical names used
everywhere downstream (see :mod:`eocausal.survey`).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from eocausal.imagery.ee_collections import (
    CLOUD_SCORE_PLUS_DEFAULT_THRESHOLD,
    COLLECTIONS,
    MASK_S2_SCL,
)
from eocausal.tiles import MAX_UNITS_PER_TILE

ESTIMATORS = ("difference_in_means", "ipw", "aipw", "dml")
FEATURE_SETS = ("none", "tabular", "image", "tabular+image")

# Study names become file names and warehouse values: keep them to a safe alphabet.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Seeds seed numpy's and torch's generators: 0 .. 2**32 - 1 (numpy's legacy RandomState range).
SEED_MAX = 2**32 - 1

# The one imagery partition of a study with local rasters (source: geotiff), which has no periods:
# its chips and embeddings live in lake/<table>/period=geotiff.parquet, as a period's would.
GEOTIFF_PERIOD = "geotiff"


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


class StudyError(ValueError):
    """A study file that does not follow the contract."""


class _DuplicateKey(yaml.YAMLError):
    """A mapping key given twice in a study file (YAML itself would keep the last silently)."""

    def __init__(self, key, first_line: int, second_line: int):
        self.key, self.first_line, self.second_line = key, first_line, second_line
        where = f"line {first_line}" if first_line == second_line else f"lines {first_line} and {second_line}"
        super().__init__(f"key {key!r} given twice ({where})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key repeated within one mapping is an error.

    Merge keys (``<<: *anchor``) may still be overridden by an explicit key: that is what they are for.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=False)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class rejects it
                    continue
        return super().construct_mapping(node, deep=deep)


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


class PeriodSpec(_Strict):
    """One imagery period: a composite over [start, end) (end exclusive, as Earth Engine's filterDate)."""

    name: str
    start: date
    end: date

    @field_validator("name")
    @classmethod
    def _safe_period_name(cls, v: str) -> str:
        # Period names become partition keys and file names.
        if not _NAME_RE.match(v):
            raise ValueError("period name must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> "PeriodSpec":
        if self.end <= self.start:
            raise ValueError(f"period {self.name!r}: end {self.end} must be after start {self.start}")
        return self


class EarthEngineExportSpec(_Strict):
    """``imagery.export``: Earth Engine batch export instead of a request per chip (see eocausal.imagery.ee_export).

    Each block of ``block_px`` x ``block_px`` chip centres is one export task writing a Cloud-Optimised
    GeoTIFF of the composite to ``gs://<bucket>/<prefix>/...``; chips are cut from it locally, with the
    same pixels and chip keys as the request-per-chip path.
    """

    bucket: str = Field(min_length=3, max_length=222, pattern=r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
    prefix: str = Field("eocausal-exports", max_length=512)
    block_px: int = Field(1024, ge=64, le=8192)  # chip centres per block side; an export is this + chip_size_px - 1
    poll_interval_s: float = Field(30.0, gt=0)
    task_timeout_s: float = Field(6 * 3600.0, gt=0)  # a task not finished by then fails its block
    max_tasks_in_flight: int = Field(20, ge=1, le=3000)  # started and not finished; Earth Engine queues them


def _year_period(value):
    """A bare year (2019 or "2019") is shorthand for that calendar year."""
    if isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"\d{4}", value)):
        year = int(value)
        return {"name": str(year), "start": date(year, 1, 1), "end": date(year + 1, 1, 1)}
    return value


class ImagerySpec(_Strict):
    source: Literal["geotiff", "earthengine", "stac"] = "geotiff"
    # geotiff: a file or folder relative to the study file, or an http(s) URL of a COG or of a
    # folder listing (read with ranged requests through GDAL's /vsicurl/).
    path: str | None = None
    chip_size_px: int = Field(64, ge=8, le=1024)
    # A unit whose chip has more than this share of nodata pixels is excluded (with a record).
    max_nodata_share: float = Field(0.2, ge=0.0, lt=1.0)
    # The chip-usability check fails (and blocks estimation) below this share of usable units.
    min_usable_share: float = Field(0.5, gt=0.0, le=1.0)
    # Overrides the file's nodata value; None means "declared value, else detect zero borders".
    nodata: float | None = None
    bands: list[int] | None = None  # 1-based band indexes; None = all bands
    # Units per spatial tile at most (eocausal.tiles): a tile is one run of chips and embeddings
    # per period (Dagster's period x tile partitions). Smaller tiles fan a study out to more runs.
    max_units_per_tile: int = Field(MAX_UNITS_PER_TILE, ge=1)

    # -- source: earthengine (see eocausal.imagery.earthengine) --------------------------------
    # earthengine: a name in eocausal.imagery.ee_collections.COLLECTIONS; stac: the collection id.
    collection: str = "landsat8_9_sr"
    # earthengine: the collection's band names; stac: band asset keys; geotiff: band labels of a
    # one-file-per-band scene (e.g. B02, B8A for Sentinel-2). None = the source's defaults.
    band_names: list[str] | None = None
    # earthengine, Sentinel-2 collections only: how a pixel is judged clear. "scl" = the scene
    # classification; "cloud_score_plus" = Cloud Score+ cs_cdf >= cloud_score_threshold.
    cloud_mask: Literal["scl", "cloud_score_plus"] = "scl"
    cloud_score_threshold: float = Field(CLOUD_SCORE_PLUS_DEFAULT_THRESHOLD, ge=0.0, le=1.0)
    # -- source: stac (see eocausal.imagery.stac); periods, max_attempts, max_concurrency and
    # request_timeout_s below apply too --------------------------------------------------------
    catalog: str | None = None  # a STAC API or static catalog URL, or a catalog file relative to the study
    max_cloud_cover: float | None = Field(None, ge=0, le=100)  # keep items with eo:cloud_cover <= this
    mask_asset: str | None = None  # "SCL" / "QA_PIXEL" asset key; None = detect by key; "none" = no mask
    # Sign asset hrefs with a Planetary Computer SAS token (eocausal.imagery.signing); None = auto:
    # planetary_computer when the catalog is on planetarycomputer.microsoft.com, else none.
    sign: Literal["none", "planetary_computer"] | None = None
    max_items: int = Field(2000, ge=1, le=100_000)  # per period; more is an error (narrow the search)
    # Composite periods: a list of {name, start, end} (or bare years), or start/end for one.
    periods: list[PeriodSpec] = Field(default_factory=list)
    start: date | None = None
    end: date | None = None
    # The period whose chips feed the analysis; None = the first (a pre-treatment baseline).
    analysis_period: str | None = None
    scale_m: float | None = Field(None, gt=0)  # pixel size; None = the collection's native size
    crs: str = "utm"  # "utm" = each unit's own UTM zone; else a CRS code such as "EPSG:32721"
    max_concurrency: int = Field(32, ge=1, le=40)  # Earth Engine allows 40 concurrent requests
    max_requests_per_second: float = Field(50.0, gt=0, le=100)  # the per-project quota is 100
    max_attempts: int = Field(10, ge=1, le=30)  # per chip, on rate limits and transient errors
    request_timeout_s: float = Field(120.0, gt=0)
    high_volume: bool = False  # use the high-volume endpoint (for many small automated requests)
    project: str | None = None  # Google Cloud project; None = from the environment/credentials
    # Batch export per block instead of one request per chip (large studies); None = per-chip requests.
    export: EarthEngineExportSpec | None = None

    @field_validator("periods", mode="before")
    @classmethod
    def _year_shorthand(cls, v):
        return [_year_period(p) for p in v] if isinstance(v, list) else v

    @field_validator("analysis_period", mode="before")
    @classmethod
    def _year_name(cls, v):
        return str(v) if isinstance(v, int) else v  # `analysis_period: 2019` names the period "2019"

    @model_validator(mode="after")
    def _path_for_geotiff(self) -> "ImagerySpec":
        if self.source == "geotiff" and not self.path:
            raise ValueError("imagery.path is required when imagery.source is 'geotiff'")
        return self

    @model_validator(mode="after")
    def _periods_for_earthengine_only(self) -> "ImagerySpec":
        if self.source not in ("earthengine", "stac"):
            given = [k for k in ("periods", "start", "end", "analysis_period") if getattr(self, k)]
            if given:
                raise ValueError(
                    f"imagery.{'/'.join(given)} apply to sources 'earthengine' and 'stac' only; a '{self.source}' "
                    f"study has one imagery partition, {GEOTIFF_PERIOD!r} (its files as they are)"
                )
        if self.source != "stac":
            given = [k for k in ("catalog", "max_cloud_cover", "mask_asset", "sign") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"imagery.{'/'.join(given)} apply to source 'stac' only")
        if self.source != "earthengine" and self.export is not None:
            raise ValueError(
                f"imagery.export (Earth Engine batch export) applies to source 'earthengine' only, not "
                f"{self.source!r}: a '{self.source}' study reads its imagery's files directly"
            )
        if self.source != "earthengine":
            given = [k for k in ("cloud_mask", "cloud_score_threshold") if k in self.model_fields_set]
            if given:
                raise ValueError(f"imagery.{'/'.join(given)} apply to source 'earthengine' (Sentinel-2) only")
        return self

    @model_validator(mode="after")
    def _stac_settings(self) -> "ImagerySpec":
        if self.source != "stac":
            return self
        if not self.catalog:
            raise ValueError("imagery.source 'stac' needs imagery.catalog (a STAC API or catalog URL, or a "
                             "catalog.json relative to the study file)")
        if "collection" not in self.model_fields_set:
            raise ValueError("imagery.source 'stac' needs imagery.collection (the STAC collection id)")
        if self.band_names is not None and not self.band_names:
            raise ValueError("imagery.band_names is empty; name the band asset keys, or leave it out")
        self._check_periods()
        return self

    @model_validator(mode="after")
    def _earthengine_settings(self) -> "ImagerySpec":
        if self.source != "earthengine":
            return self
        if self.collection not in COLLECTIONS:
            raise ValueError(f"unknown imagery.collection {self.collection!r}; known: {sorted(COLLECTIONS)}")
        known = COLLECTIONS[self.collection].bands
        unknown = [b for b in self.band_names or [] if b not in known]
        if unknown or (self.band_names is not None and not self.band_names):
            raise ValueError(f"imagery.band_names {self.band_names} not all in {self.collection}'s bands {list(known)}")
        if self.cloud_mask == "cloud_score_plus" and COLLECTIONS[self.collection].mask != MASK_S2_SCL:
            raise ValueError(f"imagery.cloud_mask 'cloud_score_plus' applies to Sentinel-2 collections only, "
                             f"not {self.collection!r}")
        self._check_periods()
        return self

    def _check_periods(self) -> None:
        if self.periods and (self.start or self.end):
            raise ValueError("give imagery.periods or imagery.start/end, not both")
        if not self.periods and not (self.start and self.end):
            raise ValueError(f"imagery.source {self.source!r} needs imagery.periods, or imagery.start and imagery.end")
        periods = self.resolved_periods()
        names = [p.name for p in periods]
        if len(set(names)) != len(names):
            raise ValueError(f"imagery.periods names repeated: {names}")
        if self.analysis_period is not None and self.analysis_period not in names:
            raise ValueError(f"imagery.analysis_period {self.analysis_period!r} is not one of the periods {names}")

    def resolved_periods(self) -> list[PeriodSpec]:
        """The study's periods, in study order (start/end make one period named start_end)."""
        if self.periods:
            return list(self.periods)
        if self.start and self.end:
            return [PeriodSpec(name=f"{self.start:%Y%m%d}_{self.end:%Y%m%d}", start=self.start, end=self.end)]
        return []

    def period(self, name: str | None = None) -> PeriodSpec:
        """A period by name; None = the analysis period."""
        periods = self.resolved_periods()
        if not periods:
            raise StudyError("the study names no imagery periods")
        wanted = name if name is not None else (self.analysis_period or periods[0].name)
        for p in periods:
            if p.name == wanted:
                return p
        raise StudyError(f"no imagery period named {wanted!r}; periods: {[p.name for p in periods]}")

    def period_names(self) -> list[str]:
        """The imagery partitions, in study order: the periods' names (Earth Engine), or the one
        partition ``geotiff`` of a study with local rasters."""
        if self.source == "geotiff":
            return [GEOTIFF_PERIOD]
        return [p.name for p in self.resolved_periods()]

    def analysis_period_name(self) -> str:
        """The imagery partition whose chips and embeddings feed the analysis."""
        if self.source == "geotiff":
            return GEOTIFF_PERIOD
        return self.period().name

    def check_period_name(self, name: str) -> str:
        """``name`` if it is one of this study's imagery partitions, else a StudyError naming them."""
        names = self.period_names()
        if name not in names:
            raise StudyError(
                f"no imagery period named {name!r}: a {self.source!r} study's imagery periods are {names}"
            )
        return name


class NormalizationSpec(_Strict):
    """A backbone's input normalisation: per band read, value = (chip * scale - mean) / std."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)
    scale: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _same_length(self) -> "NormalizationSpec":
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values, std {len(self.std)}: give one of each per band")
        if min(self.std) <= 0:
            raise ValueError("every std must be positive")
        return self


class EmbeddingSpec(_Strict):
    method: Literal["rcf", "backbone"] = "rcf"
    # RCF: 512 filters x 3 pooling scales (the confounder zoo's default; see eocausal.embed.rcf).
    # With level filters or pooling scales the width is rounded down to whole filters (1024 -> 1023).
    n_features: int = Field(1536, ge=8, le=65536)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    patch_size: int = Field(3, ge=1, le=15)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(64, ge=1)
    # Torch CPU threads for the embedding stage; None: torch's default (one per core). Set it when
    # other processes share the cores (e.g. Dagster's multiprocess executor): oversubscribed OpenMP
    # threads slow the stage many times over. Threads do not change the embeddings' version.
    cpu_threads: int | None = Field(None, ge=1, le=1024)
    # Compute dtype: auto = bfloat16 where the hardware multiplies it natively (tensor cores,
    # AVX512-BF16, AMX), else float32. bf16 features agree with float32 ones to ~1e-3 (relative).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # RCF: "both" adds MOSAIKS' negative branch relu(-(z - bias)); n_features counts both branches.
    branches: Literal["positive", "both"] = "positive"
    bias: float = 0.0  # RCF ReLU threshold
    pool_grid: int = Field(1, ge=1, le=8)  # RCF: average over a g x g grid of cells (1 = whole chip)
    # RCF filter bank: "mixed" = half whitened texture filters, half level filters (+w/-w pairs of
    # unwhitened, uncentred patches, threshold raw_bias); "whitened" = the MOSAIKS paper's bank.
    filters: Literal["whitened", "raw", "mixed"] = "mixed"
    raw_bias: float = 0.5
    # RCF: features averaged over nested centred squares with these sides (fractions of the chip);
    # [1.0] = the whole chip only. Set [1.0] to use pool_grid.
    pool_scales: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.25])
    # method backbone: architecture and a local weights file (torchvision/timm state_dict;
    # relative to the study file; never downloaded). n_features is then the backbone's width.
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "vit_b_16"] = "resnet18"
    weights: str | None = None
    input_size_px: int | None = Field(None, ge=16, le=1024)  # resize chips for the backbone
    rgb_bands: list[int] | None = None  # which chip bands get the RGB weights (else: repeated)
    # The input statistics the weights were trained with (value = (chip * scale - mean) / std per
    # band read); without it chips are standardised with the study's own band statistics.
    normalization: NormalizationSpec | None = None
    # Principal components fitted once on all embedded units and stored with the embeddings; the
    # estimators use the leading ones (analysis.image_components, "auto": chosen by CV loss).
    pca_components: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _backbone_needs_weights(self) -> "EmbeddingSpec":
        if self.method == "backbone" and not self.weights:
            raise ValueError("embedding.method 'backbone' needs embedding.weights (a local weights file)")
        return self


class LearnerSpec(_Strict):
    """A nuisance learner by name (eocausal.estimate.nuisance.NAMED_LEARNERS) and its parameters."""

    name: Literal["linear", "boosting", "random_forest", "extra_trees", "lasso", "knn"] = "linear"
    params: dict[str, Any] = Field(default_factory=dict)


class AnalysisSpec(_Strict):
    estimators: list[Literal["difference_in_means", "ipw", "aipw", "dml"]] = Field(
        default_factory=lambda: list(ESTIMATORS)
    )
    feature_sets: list[Literal["none", "tabular", "image", "tabular+image"]] = Field(
        default_factory=lambda: list(FEATURE_SETS)
    )
    folds: int = Field(5, ge=2, le=50)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    # Propensity scores are clipped to [clip, 1 - clip]; the clipped share is reported.
    propensity_clip: float = Field(0.01, gt=0.0, lt=0.5)
    # Image embeddings are reduced to this many principal components (of the PCA the embedding
    # stage stored); "auto" = chosen by cross-validated nuisance loss (eocausal.estimate.components).
    # 64 is the confounder zoo's choice: "auto" picks fewer and leaves more bias (benchmarks/results/zoo).
    image_components: int | Literal["auto"] = Field(64)
    # Compare the headline with and without a context window twice the chip's side and warn when
    # they differ beyond their SEs (the confounder extends beyond the chip): with context_components
    # the headline adjusts for the context and is compared with the chip alone; without, it is
    # compared with chip + context (about one more chip pass).
    chip_scale_check: bool = True
    # Without context_components the check reads, embeds and re-estimates on at most this many
    # units (a seeded sample that does not depend on the units' order): its cost stops growing with
    # the study, and its power at 20,000 units is above that at the zoo's sizes (500-5,000).
    chip_scale_max_units: int = Field(20_000, ge=100)
    # The image feature sets also see this many components of each unit's context window (twice the
    # chip's side at half its resolution, eocausal.embed.context), beside the chip's: a confounder
    # that extends beyond the chip (up to twice its half-side) is then adjusted for, not only
    # warned about. 0 = the chip alone (the chip-scale check then adds the context as the other
    # specification). 32 is the confounder zoo's choice (benchmarks/results/zoo/context.md): it
    # takes the three beyond-chip designs from 0.03-0.87 coverage to 0.87-0.93 and, on the 12
    # in-chip designs, lowers the RMSE on 9. Every unit's context window is read and embedded
    # (about one more chip pass; chip_scale_max_units does not cap it).
    context_components: int = Field(32, ge=0, le=1024)
    # Spatially blocked folds: units are grouped into square blocks of this size (km).
    spatial_block_km: float | None = Field(None, gt=0)
    # The outcome may be missing for some units: predict it from the image (+ covariates) and
    # report corrected (prediction-powered) and plug-in estimates beside the labelled-only ones.
    # Off, a missing outcome is an error of the survey suite.
    outcome_imputation: bool = False
    # Why outcomes are missing: "by_arm" = at random within each treatment arm; "features" = at
    # random given treatment, covariates and image (a cross-fitted model of being labelled).
    outcome_labelling: Literal["by_arm", "features"] = "by_arm"
    # Drop units whose cross-fitted propensity is outside [trim, 1 - trim] (the estimand becomes
    # the effect on the units kept; the share trimmed is in the diagnostics). None: no trimming.
    propensity_trim: float | None = Field(None, gt=0.0, lt=0.5)
    # Repeated cross-fitting: the median over this many independent fold splits.
    cross_fit_repetitions: int = Field(1, ge=1, le=100)
    # The nuisance learners, by role: {propensity: {name: random_forest, params: {...}}, outcome: ...};
    # a role left out keeps the built-in penalised linear learner.
    learners: dict[Literal["propensity", "outcome"], LearnerSpec] = Field(default_factory=dict)
    # AIPW's outcome models per arm (eocausal.estimate.nuisance.OUTCOME_ARMS): "borrow" = the
    # smaller arm's model is the larger arm's plus a model of its residuals (the confounder zoo's
    # choice: benchmarks/results/zoo/outcome_arms.md); "separate" = each arm's model on its own units.
    outcome_arms: Literal["borrow", "separate"] = "borrow"
    # The propensity in the IPW/AIPW weights (eocausal.estimate.nuisance.PROPENSITY_FITS):
    # "likelihood" = penalised logistic regression; "calibrated" = per-arm logistic models by the
    # calibration loss, whose weights balance each arm's features (eocausal.estimate.calibration;
    # measured on the confounder zoo: benchmarks/results/zoo/variants.md, session 12). Needs the
    # built-in propensity learner.
    propensity_fit: Literal["likelihood", "calibrated"] = "likelihood"

    def nuisance_learners(self) -> dict | None:
        """The learners option of eocausal.estimate (None when every role keeps the built-in one)."""
        from eocausal.estimate.nuisance import named_learner

        built = {role: named_learner(spec.name, role, spec.params, self.seed) for role, spec in self.learners.items()}
        built = {role: est for role, est in built.items() if est is not None}
        return built or None

    def nuisance_options(self) -> dict:
        """The options of eocausal.estimate that choose the nuisance models (learners, outcome arms,
        propensity fit): the estimates, their fragility checks and their sensitivity bounds all take
        these, so that they describe one and the same fit."""
        return {"learners": self.nuisance_learners(), "outcome_arms": self.outcome_arms,
                "propensity_fit": self.propensity_fit}

    @model_serializer(mode="wrap")
    def _without_later_defaults(self, handler):
        # An analysis on the built-in learners and the default outcome_arms and propensity_fit
        # serialises as before those options existed, so its versions (and the analysis_spec
        # column) are unchanged.
        data = handler(self)
        if isinstance(data, dict) and not self.learners:
            data.pop("learners", None)
        if isinstance(data, dict) and self.outcome_arms == "borrow":
            data.pop("outcome_arms", None)
        if isinstance(data, dict) and self.propensity_fit == "likelihood":
            data.pop("propensity_fit", None)
        return data

    @field_validator("learners")
    @classmethod
    def _learners_build(cls, v):
        from eocausal.estimate.nuisance import named_learner

        for role, spec in v.items():
            try:
                named_learner(spec.name, role, spec.params)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"learners.{role}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _calibrated_needs_built_in_propensity(self) -> "AnalysisSpec":
        own = self.learners.get("propensity")
        if self.propensity_fit == "calibrated" and own is not None and own.name != "linear":
            raise ValueError(f"propensity_fit 'calibrated' fits its own penalised linear propensity models; it cannot "
                             f"be combined with learners.propensity {own.name!r} (drop one of the two)")
        return self

    @property
    def fixed_image_components(self) -> int:
        """The component count of stages that take a fixed one (CATE, clusters): 64 under "auto"."""
        return 64 if self.image_components == "auto" else int(self.image_components)

    @field_validator("image_components")
    @classmethod
    def _components(cls, v):
        if v != "auto" and (isinstance(v, bool) or int(v) < 1):
            raise ValueError("image_components must be a positive integer or 'auto'")
        return v

    @field_validator("estimators", "feature_sets")
    @classmethod
    def _non_empty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one")
        if len(set(v)) != len(v):
            raise ValueError(f"names repeated: {v}")
        return v


class TransportSpec(_Strict):
    """Where the image CATE model is applied beyond the study's units (a grid of cells)."""

    enabled: bool = True
    # [west, south, east, north] in WGS84 degrees; None = the imagery's footprint (GeoTIFF sources).
    bbox: list[float] | None = None
    cells: int = Field(250, ge=1, le=100_000)  # about this many square cells (each one chip to embed)

    @field_validator("bbox")
    @classmethod
    def _box(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if len(v) != 4:
            raise ValueError("bbox must be [west, south, east, north]")
        west, south, east, north = v
        if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
            raise ValueError("bbox must be [west, south, east, north] in degrees, west < east, south < north")
        return v


class HeterogeneitySpec(_Strict):
    """Where the effect differs and why (DESIGN §6): DR-learner CATE, effect clusters, RATE,
    transport and saliency. ``heterogeneity: false`` in a study file turns it all off."""

    enabled: bool = True
    # Final-stage features of the DR-learner; its nuisances always adjust for every confounder.
    feature_sets: list[Literal["tabular", "image", "tabular+image"]] = Field(
        default_factory=lambda: ["tabular", "image", "tabular+image"]
    )
    learner: Literal["linear", "boosting"] = "linear"  # final stage
    rate_bootstrap: int = Field(200, ge=2, le=10_000)
    # Effect clusters: K, or "auto" = chosen by cross-validated held-out fit over 1..max_clusters.
    clusters: int | Literal["auto"] = 2
    max_clusters: int = Field(4, ge=2, le=10)
    cluster_penalty: float = Field(0.1, ge=0.0)
    # Saliency panels: this many most and this many least likely treated units.
    saliency_units: int = Field(3, ge=1, le=20)
    transport: TransportSpec = Field(default_factory=TransportSpec)

    @field_validator("clusters")
    @classmethod
    def _k(cls, v):
        if v != "auto" and not (1 <= int(v) <= 10):
            raise ValueError("clusters must be 1..10 or 'auto'")
        return v

    @field_validator("feature_sets")
    @classmethod
    def _sets(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"name at least one feature set, each once: {v}")
        return v


class Study(_Strict):
    name: str
    survey: SurveySpec
    imagery: ImagerySpec
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    heterogeneity: HeterogeneitySpec = Field(default_factory=HeterogeneitySpec)
    # The folder holding study.yaml; set by load_study, not by the file.
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v

    @field_validator("heterogeneity", mode="before")
    @classmethod
    def _heterogeneity_switch(cls, v):
        # `heterogeneity: true/false` is shorthand for the defaults, on or off.
        return {"enabled": v} if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _tabular_needs_covariates(self) -> "Study":
        wants_tabular = any(fs in ("tabular", "tabular+image") for fs in self.analysis.feature_sets)
        if wants_tabular and not self.survey.covariates:
            raise ValueError(
                "analysis.feature_sets asks for 'tabular' features but survey.covariates is empty"
            )
        return self

    @model_validator(mode="after")
    def _components_stored(self) -> "Study":
        # The warehouse holds embedding.pca_components scores per unit, not the embedding.
        k = self.analysis.image_components
        if k != "auto" and int(k) > self.embedding.pca_components:
            raise ValueError(
                f"analysis.image_components ({k}) exceeds embedding.pca_components "
                f"({self.embedding.pca_components}), the components the warehouse holds per unit: "
                "ask for fewer, or raise embedding.pca_components"
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
    def imagery_is_remote(self) -> bool:
        """Whether imagery.path is an http(s) URL (a remote COG or folder listing)."""
        return _is_url(self.imagery.path)

    @property
    def imagery_location(self) -> "Path | str":
        """imagery.path: the URL as given, or the local path resolved inside the study folder."""
        if self.imagery_is_remote:
            return str(self.imagery.path)
        return self.imagery_path

    @property
    def stac_catalog(self) -> "Path | str":
        """imagery.catalog: a URL as given, or a local catalog file resolved inside the study folder."""
        if self.imagery.catalog is None:
            raise StudyError("imagery.catalog is not set")
        if _is_url(self.imagery.catalog):
            return self.imagery.catalog
        return self.resolve(self.imagery.catalog)

    @property
    def imagery_path(self) -> Path:
        if self.imagery.path is None:
            raise StudyError("imagery.path is not set")
        if self.imagery_is_remote:
            raise StudyError(f"imagery.path {self.imagery.path!r} is a URL, not a local path")
        path = self.resolve(self.imagery.path)
        if path.is_dir():
            # The folder's files are read too: a link among them must not lead outside either.
            for entry in path.iterdir():
                if entry.is_symlink():
                    self.resolve(str(entry.relative_to(self.root.resolve())))
        return path

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
    if not path.is_file():
        raise StudyError(f"{path} is not a file: give the study file (study.yaml) or the folder that holds it")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is fine
    except UnicodeDecodeError as exc:
        raise StudyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise StudyError(
            f"{path}: rule 'study file keys unique' failed: {exc} - YAML would silently keep the last; "
            "give the key once"
        ) from None
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
        study.imagery_location
    if study.imagery.catalog is not None:
        study.stac_catalog
    return study


def default_workdir(study_path: str | Path) -> Path:
    """Where a study's lake, cache and warehouse live unless told otherwise: beside the study file."""
    path = Path(study_path)
    folder = path if path.is_dir() else path.parent
    return folder.resolve() / "eocausal_work"
