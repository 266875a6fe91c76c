"""Typed configuration files: the workflow YAML, the cluster YAML and a model's ``catalogbuilder.yaml``, each one
pydantic schema validated whole and up front; every problem of a file is reported at once in one :class:`ConfigError`.

Strict where a silent coercion would change a run: an integer key refuses ``true``, ``1.5`` and ``"3"``; a number
key refuses ``"abc"`` and ``true``; unknown keys are errors (except the family keys of a ``catalogbuilder.yaml``);
a mapping key written twice is an error. Each problem is one line::

    <file>: <key.path>: got <value>; allowed: <what the schema accepts>

Relative paths of a workflow YAML: ``inputs``, model folders, ``catalogs`` and ``photometric.input``/``gaia`` from
the YAML's folder; ``store`` and ``output`` from the current directory (docs/workflows.md).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    StrictBool,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from catalogbuilder.constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DRAWS,
    DEFAULT_RADIUS_ARCSEC,
    DEFAULT_RETRIES,
    DEVICES,
    GRID_APOGEE,
    GRID_OPTICAL,
    GRIDS,
    MODEL_OUTPUTS,
    PRECISIONS,
    RESAMPLED_GRIDS,
    DERIVED_GRID_NAME,
    SURVEY_CHOICES,
)

EXIT_CONFIG_ERROR = 2  # exit status of every command for a usage or configuration error
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
SHIPPED_CATALOG = PACKAGE_DATA / "catalogs" / "astronn_gaiadr2_apogeedr14_near_sample.ecsv"
DEFAULT_MODELS: Mapping[str, tuple[str, ...]] = {  # shipped demonstration models per grid (docs/workflows.md)
    GRID_APOGEE: ("anet3-cannon-demo",), GRID_OPTICAL: ("bossnet-lamost-demo",)}
DEFAULT_PHOTOMETRIC_MODEL = "sos-photometric-demo"
MODEL_INFO_FILE = "catalogbuilder.yaml"
SHIPPED_MODELS_DIR = PACKAGE_DATA / "models"
DEFAULT_FAMILY = "bossnet"
CLUSTER_KINDS: tuple[str, ...] = ("local", "local-gpu", "slurm", "pbs", "slurm-runner")
JOBQUEUE_KINDS: tuple[str, ...] = ("slurm", "pbs")
MODELS_ALLOWED = f"mapping of model grids ({', '.join(GRIDS)}) to shipped model names or model folders, at least one"
KIND_ALLOWED = f"one of {', '.join(CLUSTER_KINDS)} (default: the name of the single jobqueue section)"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$"
SHOWN_VALUE_CHARS = 80  # longer values are shortened in error lines

Schema = TypeVar("Schema", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or option that cannot be run; ``str()`` is one line per problem, each naming the file,
    the key, the value given and what is allowed (``problems`` holds the lines)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


def problem(source: str | Path, key: str, value: Any, allowed: str) -> str:
    """One line of a :class:`ConfigError`."""
    shown = repr(value)
    if len(shown) > SHOWN_VALUE_CHARS:
        shown = shown[: SHOWN_VALUE_CHARS - 1] + "…"
    return f"{source}: {key or '(whole file)'}: got {shown}; allowed: {allowed}"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping key written twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The document of a YAML file (None when empty); :class:`ConfigError` when missing or not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file not found"])
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: not valid YAML: {' '.join(str(error).split())}"]) from None


def validate(schema: type[Schema], document: Any, source: str | Path, context: Mapping[str, Any] | None = None,
             sources: Mapping[str, str] | None = None) -> Schema:
    """``document`` validated against ``schema``; every problem at once as a :class:`ConfigError` naming ``source``
    (or ``sources[top-level key]`` for keys that came from elsewhere, e.g. the command line)."""
    try:
        return schema.model_validate(document, context=dict(context or {}))
    except ValidationError as error:
        json_schema = schema.model_json_schema()
        lines = []
        for detail in error.errors(include_url=False):
            top = str(detail["loc"][0]) if detail["loc"] else ""
            lines.append(_describe(detail, json_schema, (sources or {}).get(top, str(source))))
        raise ConfigError(lines) from None


def _key(loc: Sequence[str | int]) -> str:
    """``('inference', 'batch_size')`` → ``inference.batch_size``; list positions as ``inputs[2]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe(detail: Mapping[str, Any], json_schema: dict[str, Any], source: str) -> str:
    """One :func:`problem` line for one pydantic error."""
    loc, kind = tuple(detail["loc"]), detail["type"]
    if kind == "config_problem":  # raised by a model validator, naming a key inside its model
        context = detail["ctx"]
        return problem(source, _key(loc + tuple(context["key"].split("."))), context["value"], context["allowed"])
    if kind == "extra_forbidden":
        known = _container(_node(json_schema, loc[:-1]), json_schema).get("properties", {})
        return f"{source}: {_key(loc)}: unknown key; allowed keys here: {', '.join(known) or 'none'}"
    if loc and loc[-1] == "[key]":  # a mapping key outside the allowed names
        names = _node(json_schema, loc[:-2]).get("propertyNames", {})
        return f"{source}: {_key(loc[:-1])}: unknown key; allowed keys here: {_allowed(names, json_schema)}"
    allowed = _allowed(_node(json_schema, loc), json_schema)
    if kind == "missing":
        return f"{source}: {_key(loc)}: missing; allowed: {allowed}"
    if kind == "value_error":  # our validators say what is allowed in their message
        allowed = str(detail["ctx"]["error"])
    return problem(source, _key(loc), detail["input"], allowed)


def _dereferenced(node: dict[str, Any], json_schema: dict[str, Any]) -> dict[str, Any]:
    """``node`` with a ``$ref`` replaced by its definition."""
    if "$ref" in node:
        definition = json_schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        return {**definition, **{key: value for key, value in node.items() if key != "$ref"}}
    return node


def _container(node: dict[str, Any], json_schema: dict[str, Any]) -> dict[str, Any]:
    """The mapping or list branch of ``node`` (``X | None`` and ``X | list[X]`` schemas have several)."""
    branches = [_dereferenced(branch, json_schema) for branch in node.get("anyOf", [node])]
    return next((branch for branch in branches if branch.get("type") in ("object", "array")), node)


def _node(json_schema: dict[str, Any], loc: Sequence[str | int]) -> dict[str, Any]:
    """The JSON schema of the value at ``loc`` (``{}`` when the path leaves the schema)."""
    node = _dereferenced(json_schema, json_schema)
    for part in loc:
        container = _container(node, json_schema)
        if isinstance(part, int):
            fixed = container.get("prefixItems", [])  # a tuple's positions
            node = fixed[part] if part < len(fixed) else container.get("items", {})
        elif part in container.get("properties", {}):
            node = container["properties"][part]
        elif isinstance(container.get("additionalProperties"), dict):
            node = container["additionalProperties"]
        else:
            return {}
        node = _dereferenced(node, json_schema)
    return node


def _allowed(node: dict[str, Any], json_schema: dict[str, Any]) -> str:
    """What a JSON schema accepts, in words: ``integer > 0``, ``one of auto, cpu, cuda``, ``list of string``."""
    node = _dereferenced(node, json_schema)
    if "allowed" in node:  # a phrase given by the schema itself (json_schema_extra)
        return str(node["allowed"])
    if "anyOf" in node:
        branches = [_dereferenced(branch, json_schema) for branch in node["anyOf"]]
        if len(branches) == 2 and branches[1].get("items") == branches[0]:  # one value or a list of them
            least = node.get("minItems", branches[1].get("minItems"))
            return f"{_allowed(branches[0], json_schema)}, or a list of them" + (
                f" (at least {least})" if least else "")
        return " or ".join(dict.fromkeys(_allowed(branch, json_schema) for branch in branches))
    if "enum" in node:
        return "one of " + ", ".join(str(value) for value in node["enum"])
    if "const" in node:
        return str(node["const"])
    kind = node.get("type")
    if kind in ("integer", "number"):
        bounds = [f"{symbol} {node[name]}" for name, symbol in
                  (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
                  if name in node]
        return " and ".join([f"{kind} {bounds[0]}" if bounds else kind, *bounds[1:]])
    if kind == "array":
        if "prefixItems" in node:
            return "[" + ", ".join(_allowed(item, json_schema) for item in node["prefixItems"]) + "]"
        least = f", at least {node['minItems']}" if "minItems" in node else ""
        return f"list of ({_allowed(node.get('items', {}), json_schema)}{least})"
    if kind == "object":
        if "properties" in node:
            return "mapping with keys " + ", ".join(node["properties"])
        keys = _allowed(node.get("propertyNames", {"type": "string"}), json_schema)
        values = _allowed(node.get("additionalProperties", {}), json_schema) if isinstance(
            node.get("additionalProperties"), dict) else "anything"
        least = f", at least {node['minProperties']} entry" if "minProperties" in node else ""
        return f"mapping of ({keys}) to ({values}){least}"
    return {"string": "string", "boolean": "true or false", "null": "null"}.get(kind or "", "see the documentation")


class _Strict(BaseModel):
    """Base of every schema: strict types, no unknown keys, finite numbers, immutable after validation."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


# --- paths of the workflow YAML ---------------------------------------------------------------------------------------

def _folder_of(info: ValidationInfo, name: str) -> Path:
    """``base`` (the YAML's folder) or ``cwd`` from the validation context; the current directory by default."""
    return Path((info.context or {}).get(name) or Path.cwd())


def absolute_entry(base: Path, entry: str) -> str:
    """``entry`` as an absolute path when it is relative to ``base`` (``@list.txt`` keeps its ``@``)."""
    prefix, text = ("@", entry[1:]) if entry.startswith("@") else ("", entry)
    path = Path(text).expanduser()
    return prefix + str(path if path.is_absolute() else (base / path).resolve())


def _listed(value: Any) -> Any:
    """A single string stands for a list of one."""
    return [value] if isinstance(value, str) else value


def _input_entry(entry: str, info: ValidationInfo) -> str:
    return absolute_entry(_folder_of(info, "base"), entry)


def _existing_entry(entry: str, info: ValidationInfo) -> str:
    path = absolute_entry(_folder_of(info, "base"), entry)
    if not Path(path).exists():
        raise ValueError(f"path of an existing file or folder; {path} does not exist")
    return path


def _model_entry(entry: str, info: ValidationInfo) -> str:
    """A model folder relative to the YAML (made absolute), or the name of a shipped model as given."""
    candidate = _folder_of(info, "base") / Path(entry).expanduser()
    return str(candidate.resolve()) if candidate.is_dir() else entry


def _cwd_folder(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError("folder path (relative: from the current directory)")
    return (_folder_of(info, "cwd") / Path(value).expanduser()).resolve()


def _allowed_text(text: str) -> FieldInfo:
    """What error messages say a value may be, where the type alone says too little (e.g. ``string``)."""
    return Field(json_schema_extra={"allowed": text})


Text = Annotated[str, StringConstraints(min_length=1)]
InputEntry = Annotated[Text, AfterValidator(_input_entry), _allowed_text(
    "path of a FITS file, a folder or an @list.txt (relative: from the YAML's folder)")]
ExistingEntry = Annotated[Text, AfterValidator(_existing_entry),
                          _allowed_text("path of an existing file or folder (relative: from the YAML's folder)")]
ModelEntry = Annotated[Text, AfterValidator(_model_entry),
                       _allowed_text("shipped model name or model folder (relative: from the YAML's folder)")]
CwdFolder = Annotated[Path, BeforeValidator(_cwd_folder, json_schema_input_type=str),
                      _allowed_text("folder path (relative: from the current directory)")]


def _one_or_many(entry: Any) -> BeforeValidator:
    """A list of ``entry`` values where a single value stands for a list of one."""
    return BeforeValidator(_listed, json_schema_input_type=entry | list[entry])


class InferenceSettings(_Strict):
    """``inference:`` of a workflow YAML (options of :func:`catalogbuilder.inference.graph.run_inference`)."""

    device: Literal[DEVICES] = "auto"
    precision: Literal[PRECISIONS] = "float32"
    batch_size: PositiveInt = DEFAULT_BATCH_SIZE
    spectra_per_task: PositiveInt | None = None  # None: one task per store chunk
    retries: NonNegativeInt = DEFAULT_RETRIES


class PhotometricSettings(_Strict):
    """``photometric:`` of a workflow YAML: the photometric stage for sources with photometry but no spectrum."""

    input: ExistingEntry
    model: ModelEntry = Field(DEFAULT_PHOTOMETRIC_MODEL, validate_default=True)
    gaia: ExistingEntry | None = None


class WorkflowSettings(_Strict):
    """A workflow YAML (docs/workflows.md): every key optional, with the documented default; paths absolute."""

    inputs: Annotated[list[InputEntry], _one_or_many(InputEntry)] = []
    survey: Literal[SURVEY_CHOICES] = "auto"
    store: CwdFolder = Field("catalog-output/store", validate_default=True)
    output: CwdFolder = Field("catalog-output", validate_default=True)
    models: Annotated[
        dict[Literal[GRIDS], Annotated[list[ModelEntry], _one_or_many(ModelEntry), Field(min_length=1)]],
        Field(min_length=1)
    ] = Field(default_factory=lambda: {grid: list(names) for grid, names in DEFAULT_MODELS.items()},
              validate_default=True, json_schema_extra={"allowed": MODELS_ALLOWED})
    draws: NonNegativeInt = DEFAULT_DRAWS
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0  # stored in the int64 `seed` column of the results
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    catalogs: Annotated[list[ExistingEntry], _one_or_many(ExistingEntry)] = Field(
        [str(SHIPPED_CATALOG)], validate_default=True)
    radius_arcsec: PositiveFloat = DEFAULT_RADIUS_ARCSEC
    photometric: PhotometricSettings | None = None
    sync: StrictBool = False  # the inputs are the complete set: active files not among them are retired
    fits: StrictBool = True  # write the single FITS file of each table (off for nightly increments: Parquet parts only)
    progress: StrictBool = True

    @classmethod
    def load(cls, path: str | Path, overrides: Mapping[str, Any] | None = None,
             cwd: Path | None = None) -> WorkflowSettings:
        """Read a workflow YAML; ``overrides`` (top-level keys, e.g. from the command line; give absolute
        ``inputs``) replace its keys before validation, and their problems are reported as ``command line``."""
        path = Path(path).expanduser().resolve()
        document = read_yaml(path)
        document = {} if document is None else document
        if overrides:
            if not isinstance(document, dict):
                raise ConfigError([problem(path, "", document, "a mapping of the keys in docs/workflows.md")])
            document = {**document, **overrides}
        return validate(cls, document, path, {"base": path.parent, "cwd": cwd or Path.cwd()},
                        {key: "command line" for key in overrides or {}})


# --- cluster YAML -----------------------------------------------------------------------------------------------------

def _underscored(mapping: Any) -> Any:
    """dask config spells keys with ``-``; Python keyword arguments need ``_``."""
    if not isinstance(mapping, dict):
        return mapping  # refused by the schema as not a mapping
    return {str(key).replace("-", "_"): value for key, value in mapping.items()}


class ScaleSettings(_Strict):
    """``catalogbuilder.scale``: a fixed number of jobs (jobqueue) or workers (local); ``scale: N`` is ``{jobs: N}``."""

    jobs: PositiveInt


class AdaptSettings(_Strict):
    """``catalogbuilder.adapt``: adaptive bounds, jobs (jobqueue) or workers (local)."""

    minimum: NonNegativeInt | None = None
    maximum: PositiveInt | None = None

    @model_validator(mode="after")
    def _ordered(self) -> AdaptSettings:
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise PydanticCustomError("config_problem", "minimum above maximum", {
                "key": "minimum", "value": self.minimum, "allowed": f"at most maximum ({self.maximum})"})
        return self


class ClusterSection(_Strict):
    """The ``catalogbuilder:`` section of a cluster YAML (keys may be written with ``-`` or ``_``)."""

    kind: Annotated[Literal[CLUSTER_KINDS] | None, _allowed_text(KIND_ALLOWED)] = None
    scale: Annotated[ScaleSettings | None, BeforeValidator(
        lambda value: {"jobs": value} if isinstance(value, int) and not isinstance(value, bool) else value)] = None
    adapt: AdaptSettings | None = None
    options: Annotated[dict[str, Any], BeforeValidator(_underscored)] = {}
    wait_for_workers: NonNegativeInt | None = None  # None: 0, or every worker task of the SLURM runner

    @model_validator(mode="before")
    @classmethod
    def _dask_spelling(cls, document: Any) -> Any:
        return _underscored(document)

    @model_validator(mode="after")
    def _one_sizing(self) -> ClusterSection:
        if self.scale is not None and self.adapt is not None:
            raise PydanticCustomError("config_problem", "scale and adapt", {
                "key": "adapt", "value": self.adapt.model_dump(exclude_none=True),
                "allowed": "either scale or adapt, not both"})
        return self


class ClusterSettings(_Strict):
    """A cluster YAML: dask-jobqueue's ``jobqueue:`` section (keyword arguments of SLURMCluster / PBSCluster, passed
    through) and our ``catalogbuilder:`` section. The attributes ``kind``, ``jobqueue``, ``options``, ``scale_jobs``,
    ``adapt``, ``wait_for_workers`` and ``source`` are what :mod:`catalogbuilder.cluster` starts a cluster from."""

    section: ClusterSection = Field(default_factory=ClusterSection, alias="catalogbuilder")
    queues: dict[str, dict[str, Any] | None] = Field(default_factory=dict, alias="jobqueue")
    _source: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _known_kind_with_queue(self) -> ClusterSettings:
        if self.kind not in CLUSTER_KINDS:
            raise PydanticCustomError("config_problem", "kind", {
                "key": "catalogbuilder.kind", "value": self.kind, "allowed": KIND_ALLOWED})
        if self.kind in JOBQUEUE_KINDS and not {"cores", "memory"} <= set(self.jobqueue):
            raise PydanticCustomError("config_problem", "queue", {
                "key": f"jobqueue.{self.kind}", "value": self.queues.get(self.kind),
                "allowed": f"keyword arguments of dask-jobqueue's {self.kind} cluster, including cores and memory"})
        return self

    @classmethod
    def parse(cls, document: Any, source: str | Path | None = None) -> ClusterSettings:
        """A loaded cluster YAML document, validated; ``source`` names it in errors."""
        settings = validate(cls, document, source or "cluster config")
        settings._source = Path(source) if source else None
        return settings

    @classmethod
    def load(cls, path: str | Path) -> ClusterSettings:
        """Read and validate a cluster YAML file."""
        path = Path(path).expanduser().resolve()
        return cls.parse(read_yaml(path), path)

    @property
    def kind(self) -> str | None:
        """``catalogbuilder.kind``, or the name of the single ``jobqueue`` section."""
        return self.section.kind or (next(iter(self.queues)) if len(self.queues) == 1 else None)

    @property
    def jobqueue(self) -> dict[str, Any]:
        """Keyword arguments of the jobqueue cluster class (``_`` keys; the YAML's ``name`` is ``job_name``)."""
        if self.kind not in JOBQUEUE_KINDS:
            return {}
        options = _underscored(self.queues.get(self.kind) or {})
        if "name" in options:
            options.setdefault("job_name", options.pop("name"))
        return options

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.section.options)

    @property
    def scale_jobs(self) -> int | None:
        return self.section.scale.jobs if self.section.scale else None

    @property
    def adapt(self) -> dict[str, int] | None:
        return self.section.adapt.model_dump(exclude_none=True) if self.section.adapt else None

    @property
    def wait_for_workers(self) -> int | None:
        return self.section.wait_for_workers

    @property
    def source(self) -> Path | None:
        return self._source


# --- a model's catalogbuilder.yaml ------------------------------------------------------------------------------------

BOUNDS_ALLOWED = "[low, high] with low < high"


def _bounds_pair(value: Any) -> Any:
    """A YAML list of two numbers as a tuple (anything else is refused as not ``[low, high]``)."""
    if isinstance(value, list):
        if len(value) != 2:
            raise ValueError(BOUNDS_ALLOWED)
        return tuple(value)
    return value


def _ordered_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    if not bounds[0] < bounds[1]:
        raise ValueError(BOUNDS_ALLOWED)
    return bounds


def _none_as_empty(empty: str | dict[str, Any]) -> BeforeValidator:
    """A key written with no value (YAML null) reads as the empty value."""
    return BeforeValidator(lambda value: type(empty)() if value is None else value)


NAME_ALLOWED = "one folder name: ASCII letters, digits, '.', '_', '+', '-', not starting with '.'"
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN), _allowed_text(NAME_ALLOWED)]
Bounds = Annotated[tuple[float, float], BeforeValidator(_bounds_pair), AfterValidator(_ordered_bounds)]
_MODEL_NAME = TypeAdapter(ModelName)


def model_name(text: str) -> str:
    """``text`` when it is a valid model name (one safe folder name), else ``ValueError`` (an argparse ``type``)."""
    try:
        return _MODEL_NAME.validate_python(text, strict=True)
    except ValidationError:
        raise ValueError(f"{text!r} is not {NAME_ALLOWED}") from None


GRID_NAME_ALLOWED = (f"an ingest grid ({', '.join(GRIDS)}), or a model's own grid: lower-case letters, digits, '.', '_', "
                     "'-' (up to 64), with grid_wavelengths")
WAVELENGTHS_ALLOWED = ("linear: start and stop (Å, stop > start) without step; log-linear: start (log10 Å) and step "
                       "without stop")


class GridWavelengths(_Strict):
    """``grid_wavelengths:`` of a model trained on its own grid: the ingest grid whose spectra it takes (``base``; one
    keeping native pixels) and its wavelengths, ``linear`` from ``start`` to ``stop`` Å in ``pixels`` points or
    ``log-linear`` (log10 λ = ``start`` + ``step``·i). ``catalogbuilder store regrid`` fills such a grid."""

    base: Literal[RESAMPLED_GRIDS]
    spacing: Literal["linear", "log-linear"] = "linear"
    start: float
    stop: float | None = None
    step: PositiveFloat | None = None
    pixels: Annotated[int, Field(ge=2)]

    @model_validator(mode="after")
    def _complete(self) -> GridWavelengths:
        linear_ok = self.stop is not None and self.step is None and self.stop > self.start
        if not (linear_ok if self.spacing == "linear" else self.step is not None and self.stop is None):
            raise PydanticCustomError("config_problem", "wavelengths", {
                "key": "spacing", "value": self.model_dump(exclude_none=True), "allowed": WAVELENGTHS_ALLOWED})
        return self


def shipped_models() -> list[str]:
    """Names of the models shipped in ``catalogbuilder/data/models/``."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(path.name for path in SHIPPED_MODELS_DIR.iterdir() if (path / "model_args.yaml").exists()
                  or (path / MODEL_INFO_FILE).exists())


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """A model directory from a path, or from the name of a shipped model."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path.resolve()
    shipped = SHIPPED_MODELS_DIR / str(name_or_dir)
    if shipped.is_dir():
        return shipped
    raise FileNotFoundError(f"no model directory {str(name_or_dir)!r} and no shipped model of that name "
                            f"(shipped: {shipped_models() or 'none'})")


class ModelInfoSettings(_Strict):
    """A model folder's ``catalogbuilder.yaml`` (every key optional). ``name`` becomes a folder name of the results
    store and of release folders, so it must be one safe path component; ``domain`` maps outputs to the [low, high]
    range of the training labels; other keys are family settings, kept in :attr:`extra`."""

    model_config = ConfigDict(extra="allow")

    name: ModelName
    family: Text = DEFAULT_FAMILY
    grid: Annotated[str, StringConstraints(pattern=f"^{DERIVED_GRID_NAME}$"), _allowed_text(GRID_NAME_ALLOWED)] | None = (
        None)  # None: the family decides (photometric models have no grid)
    grid_wavelengths: GridWavelengths | None = None  # a grid other than the ingest grids (docs/models.md)
    description: Annotated[str, _none_as_empty("")] = ""
    domain: Annotated[dict[Literal[MODEL_OUTPUTS], Bounds], _none_as_empty({})] = {}

    @model_validator(mode="after")
    def _grid_defined(self) -> ModelInfoSettings:
        builtin = self.grid is None or self.grid in GRIDS
        if builtin == (self.grid_wavelengths is not None):
            raise PydanticCustomError("config_problem", "grid_wavelengths", {
                "key": "grid_wavelengths", "value": self.grid_wavelengths and self.grid_wavelengths.model_dump(),
                "allowed": f"absent for the ingest grids ({', '.join(GRIDS)}) and for no grid; given for any other "
                           f"grid name ({self.grid!r})"})
        return self

    @property
    def extra(self) -> dict[str, Any]:
        """The family-specific keys (e.g. ``training`` of a trained model, the photometric model's ``bands``)."""
        return dict(self.model_extra or {})

    @classmethod
    def read(cls, directory: str | Path) -> ModelInfoSettings:
        """``<directory>/catalogbuilder.yaml`` validated (defaults when absent; ``name``: the folder's name)."""
        directory = Path(directory).resolve()
        path = directory / MODEL_INFO_FILE
        document = read_yaml(path) if path.is_file() else None
        document = {} if document is None else document
        if isinstance(document, dict) and document.get("name") is None:
            document = {**document, "name": directory.name}
        return validate(cls, document, path)
