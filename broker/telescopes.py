"""Telescope profiles: what a telescope's FITS headers do not say, in one small TOML file each.

A profile names the telescope (the ``TELESCOP`` or ``INSTRUME`` value that selects it) and gives
what its headers lack or get wrong: detector gain, read noise and saturation, pixel scale (a hint
for the plate solver), vendor filter names, whether ``DATE-OBS`` is the start or the middle of the
exposure, and the nominal zero point that the photometric calibration checks frames against.
``broker telescope add`` writes one (:func:`write_profile`); the producer and the ingest stage read
every ``*.toml`` of the directory ``[ingest] telescopes_dir`` (:func:`load_profiles`). The format is
documented in ``docs/telescopes.md``.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from broker.errors import ProfileError

#: What ``DATE-OBS`` marks: the shutter opening or the middle of the exposure.
TIME_REFERENCES = ("start", "mid")


@dataclass(frozen=True)
class TelescopeProfile:
    """What one telescope's headers lack.

    Attributes
    ----------
    name : str
        Telescope name written into ``TELESCOP`` (letters, digits, ``._-``; it keys references).
    match : tuple of str
        Header values (of ``TELESCOP`` or ``INSTRUME``, compared case-insensitively, leading and
        trailing blanks ignored) that select this profile; the name itself always matches.
    gain : float or None
        Detector gain (e-/ADU) when the header has no ``GAIN``/``EGAIN``.
    read_noise : float or None
        Read noise (e-) when the header has no ``RDNOISE``.
    saturation : float or None
        Saturation level (ADU) when the header has no ``SATURATE``.
    pixel_scale_arcsec : float or None
        Pixel scale (arcsec/px, unbinned) used as the plate solver's scale hint when the header
        gives neither ``PIXSCALE``/``SECPIX``/``IM_SCALE`` nor ``XPIXSZ`` and ``FOCALLEN``.
    filters : dict of str to str
        Vendor filter name -> canonical band (``broker.headers.BANDS``), on top of the built-in
        aliases (``broker.headers.FILTER_ALIASES``).
    time_reference : str
        ``start`` (default) or ``mid``: what the header's ``DATE-OBS`` marks.
    zeropoint_1s : float or None
        Nominal zero point for a 1 s exposure (mag of a source giving 1 ADU/s) in clear weather;
        a frame whose measured zero point is fainter by more than
        ``PhotCalConfig.max_extinction_mag`` is flagged ``zp_offset`` (clouds). None: not checked.
    field_grid_deg : float
        Side of the sky-grid cells (deg) that name the field of a frame without a ``FIELD`` card
        (:func:`broker.headers.grid_field`): repeated pointings of one target land in one cell and
        share a reference. Default 0.5 deg: a pointing error of a smart telescope is a few arcmin.
    """

    name: str
    match: tuple[str, ...] = ()
    gain: float | None = None
    read_noise: float | None = None
    saturation: float | None = None
    pixel_scale_arcsec: float | None = None
    filters: dict[str, str] = field(default_factory=dict)
    time_reference: str = "start"
    zeropoint_1s: float | None = None
    field_grid_deg: float = 0.5

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.name):
            raise ProfileError(f"telescope name {self.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        for attr, lo, hi in (("gain", 0.0, 1000.0), ("read_noise", 0.0, 1000.0), ("saturation", 0.0, 1e10),
                             ("pixel_scale_arcsec", 0.01, 3600.0), ("zeropoint_1s", 0.0, 50.0)):
            value = getattr(self, attr)
            if value is not None and not (math.isfinite(value) and lo < value <= hi):
                raise ProfileError(f"telescope {self.name}: {attr}={value} outside ({lo:g}, {hi:g}]")
        if self.time_reference not in TIME_REFERENCES:
            raise ProfileError(f"telescope {self.name}: time_reference={self.time_reference!r}, "
                               f"not one of {TIME_REFERENCES}")
        if not (math.isfinite(self.field_grid_deg) and 0.01 <= self.field_grid_deg <= 30.0):
            raise ProfileError(f"telescope {self.name}: field_grid_deg={self.field_grid_deg} outside [0.01, 30]")

    def matches(self, header_value: str) -> bool:
        """Whether a ``TELESCOP``/``INSTRUME`` value selects this profile."""
        value = header_value.strip().lower()
        return bool(value) and value in {self.name.lower(), *(m.strip().lower() for m in self.match)}


def _check_bands(filters: dict, where: str) -> None:
    """ProfileError for a ``[filters]`` value that is no canonical band (a typo would key references of its own)."""
    from broker.headers import BANDS  # broker.headers imports this module

    bad = sorted(f"{k} = {v!r}" for k, v in filters.items() if v not in BANDS)
    if bad:
        raise ProfileError(f"{where}: [filters] {bad} name no canonical band; bands: {', '.join(BANDS)}")


def profile_from_dict(values: dict, where: str = "profile") -> TelescopeProfile:
    """A :class:`TelescopeProfile` from a parsed TOML table (raises :class:`ProfileError`)."""
    known = {f.name for f in fields(TelescopeProfile)}
    unknown = set(values) - known
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = dict(values)
    if "match" in kwargs:
        if not isinstance(kwargs["match"], list):  # a string would select the profile by each of its letters
            raise ProfileError(f"{where}: match must be an array of header values, e.g. match = [\"Seestar S50\"]")
        kwargs["match"] = tuple(str(m) for m in kwargs["match"])
    if "filters" in kwargs and not isinstance(kwargs["filters"], dict):
        raise ProfileError(f"{where}: [filters] must be a table of vendor name = band")
    _check_bands(kwargs.get("filters") or {}, where)
    try:
        return TelescopeProfile(**kwargs)
    except TypeError as exc:
        raise ProfileError(f"{where}: {exc}") from exc


def load_profile(path: str | Path) -> TelescopeProfile:
    """Read one profile file (raises :class:`ProfileError` naming the file)."""
    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"cannot read telescope profile {path}: {exc}") from exc
    return profile_from_dict(values, str(path))


def load_profiles(directory: str | Path | None) -> tuple[TelescopeProfile, ...]:
    """Every ``*.toml`` profile of ``directory`` (sorted by file name); () for None."""
    if directory is None:
        return ()
    path = Path(directory)
    if not path.is_dir():
        raise ProfileError(f"telescope profile directory {path} does not exist")
    return tuple(load_profile(p) for p in sorted(path.glob("*.toml")))


def find_profile(profiles: tuple[TelescopeProfile, ...], telescop: str, instrume: str) -> TelescopeProfile | None:
    """The first profile selected by the header's ``TELESCOP``, else by its ``INSTRUME``; None when none is."""
    for value in (telescop, instrume):
        for profile in profiles:
            if profile.matches(value):
                return profile
    return None


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(float(value)) if isinstance(value, float) else str(value)


def profile_toml(profile: TelescopeProfile) -> str:
    """The TOML text of ``profile`` (unset values left out); :func:`load_profile` reads it back equal."""
    lines = ["# telescope profile for the broker (docs/telescopes.md)"]
    for f in fields(profile):
        value = getattr(profile, f.name)
        if f.name != "filters" and value is not None and value != ():
            lines.append(f"{f.name} = {_toml_value(value)}")
    if profile.filters:
        lines += ["", "[filters]"]
        lines += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in sorted(profile.filters.items())]
    return "\n".join(lines) + "\n"


def write_profile(directory: str | Path, profile: TelescopeProfile, overwrite: bool = False) -> Path:
    """Write ``profile`` as ``<directory>/<name>.toml``; the path.

    Raises
    ------
    ProfileError
        The file exists, cannot be written, or would not read back (:func:`load_profile` refusing it
        would stop every reader of the directory): a band that is not canonical, a control character.
    """
    path = Path(directory) / f"{profile.name}.toml"
    if path.exists() and not overwrite:
        raise ProfileError(f"{path} exists (use --overwrite to replace it)")
    text = profile_toml(profile)
    try:
        profile_from_dict(tomllib.loads(text), f"telescope {profile.name}")
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"telescope {profile.name}: a match or filter name holds a control character "
                           f"(header values are printable ASCII): {exc}") from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:  # the directory is a file, or out of reach
        raise ProfileError(f"cannot write {path}: {exc}") from exc
    return path
