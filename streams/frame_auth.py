"""Which principal may send frames of which telescope: signed frames, checked by the ingest stage.

Kafka cannot say it: its ACLs are per topic, not per key, and a consumer never sees the principal
that produced a record. tansu has no ACLs at all. So a producer signs each frame with a key of its
own, and the ingest stage checks the signature against a telescope -> principals map::

    [kafka.frame_auth]
    telescopes = {LSST = ["lsst"], ZTF = ["ztf", "ztf-backup"]}   # who may send each telescope's frames
    keys_file = "/run/secrets/frame-keys.toml"   # ingest: principal = "key", one line each
                                                 #   (or BROKER_FRAME_KEYS_FILE)
    signer = "lsst"                              # a producer: the principal it signs as (BROKER_FRAME_SIGNER)
    key_file = "/run/secrets/frame-key"          # a producer: its key (BROKER_FRAME_KEY_FILE; or BROKER_FRAME_KEY)

The header ``frame-auth`` is ``<principal>:<hex HMAC-SHA256>`` over the message key (``telescope/field``)
and the SHA-256 of the value (which holds the FITS bytes, or their SHA-256 when sent by reference,
so the pixels are covered either way). With ``telescopes`` set, ingest dead-letters as
``unauthorised`` a frame without a valid signature, signed by a principal not listed for the
telescope of its key, or whose FITS ``TELESCOP`` is not the telescope of its key. Without it
(the default) nothing is checked.

Limits: the keys are shared secrets (the ingest stage can sign, so it is trusted as a broker
principal with write access to ``frames`` would be anyway); a signed frame can be sent again
(frame-level idempotence drops it); the signature says who sent a frame, not that its pixels are
physically right. The other headers (the schema tag and the shutter-close time) are not signed:
changing them makes the record undecodable (a dead letter) or skews the latency metrics, never
the pixels or the telescope a frame is processed as.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.errors import ConfigError, Unauthorised
from streams.security import read_secret

HEADER = "frame-auth"
_DOMAIN = b"frame-auth/1\n"


def signature(key: bytes, principal: str, msg_key: bytes | None, value: bytes | None) -> str:
    """Hex HMAC-SHA256 of a frame message by ``principal`` under ``key``."""
    digest = hashlib.sha256(value or b"").digest()
    data = _DOMAIN + principal.encode() + b"\n" + (msg_key or b"") + b"\n" + digest
    return hmac.new(key, data, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class FrameSigner:
    """A producer's signing identity: principal and key (the key never in ``repr``)."""

    principal: str
    key: bytes = field(repr=False)

    def header(self, msg_key: bytes | None, value: bytes | None) -> dict[str, bytes]:
        """The ``frame-auth`` header of a message."""
        return {HEADER: f"{self.principal}:{signature(self.key, self.principal, msg_key, value)}".encode()}

    @classmethod
    def load(cls, kafka: Mapping | None = None, env: Mapping[str, str] | None = None) -> FrameSigner | None:
        """The signer of ``[kafka.frame_auth]`` and the environment, or None when none is configured."""
        env = os.environ if env is None else env
        table = _table(kafka)
        principal = env.get("BROKER_FRAME_SIGNER") or table.get("signer")
        if not principal:
            return None
        _check_principals([str(principal)])
        if env.get("BROKER_FRAME_KEY"):
            key = env["BROKER_FRAME_KEY"]
        else:
            path = env.get("BROKER_FRAME_KEY_FILE") or table.get("key_file")
            if not path:
                raise ConfigError(f"frame signer {principal!r} has no key (BROKER_FRAME_KEY_FILE or key_file)")
            key = read_secret(str(path), "frame signing key")
        if not key.strip():  # an empty key signs what anyone can sign
            raise ConfigError(f"the frame signing key of {principal!r} is empty (BROKER_FRAME_KEY_FILE or key_file)")
        return cls(str(principal), key.encode())


@dataclass(frozen=True)
class FrameAuthoriser:
    """The ingest stage's check: telescope -> principals allowed, and each principal's key.

    Attributes
    ----------
    telescopes : dict of str to tuple of str
        Principals that may send each telescope's frames; empty: no check (the default).
    keys : dict of str to bytes
        Each principal's signing key (never in ``repr``).
    """

    telescopes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def enabled(self) -> bool:
        """Whether frames are checked."""
        return bool(self.telescopes)

    def check(self, msg_key: bytes | None, value: bytes | None, headers: Mapping[str, bytes]) -> str:
        """The telescope of a correctly signed frame by an allowed principal; ``Unauthorised`` otherwise."""
        telescope = self._telescope_of((msg_key or b"").decode(errors="replace"))
        allowed = self.telescopes.get(telescope)
        if allowed is None:
            raise Unauthorised(f"no principal may send frames of telescope {telescope!r} ([kafka.frame_auth])")
        raw = headers.get(HEADER)
        if not raw:
            raise Unauthorised(f"unsigned frame of telescope {telescope!r} (no {HEADER} header)")
        principal, _, sig = raw.decode(errors="replace").partition(":")
        if principal not in allowed:
            raise Unauthorised(f"principal {principal!r} may not send frames of telescope {telescope!r}")
        key = self.keys.get(principal)  # bytes compared: a non-ASCII str made compare_digest raise TypeError
        if key is None or not hmac.compare_digest(sig.encode(), signature(key, principal, msg_key, value).encode()):
            raise Unauthorised(f"bad signature by {principal!r} on a frame of telescope {telescope!r}")
        return telescope

    def _telescope_of(self, key: str) -> str:
        """The telescope a ``<telescope>/<field>`` message key names: the longest configured one it starts with.

        A telescope's name may hold ``/`` itself (``TELESCOP = 'ESO/VLT'``); a key of no configured
        telescope names its text up to the first ``/``.
        """
        known = [t for t in self.telescopes if key.startswith(t + "/")]
        return max(known, key=len) if known else key.split("/", 1)[0]

    @staticmethod
    def check_telescope(signed: str, telescope: str) -> None:
        """``Unauthorised`` unless the frame's FITS ``TELESCOP`` is the telescope its signed key names."""
        if telescope != signed:
            raise Unauthorised(f"frame of telescope {telescope!r} sent under the key of telescope {signed!r}")

    @classmethod
    def load(cls, kafka: Mapping | None = None, env: Mapping[str, str] | None = None) -> FrameAuthoriser:
        """The map of ``[kafka.frame_auth]`` and its keys file (``BROKER_FRAME_KEYS_FILE`` wins)."""
        env = os.environ if env is None else env
        table = _table(kafka)
        telescopes = table.get("telescopes") or {}
        if not isinstance(telescopes, dict) or not all(isinstance(v, list) for v in telescopes.values()):
            raise ConfigError("[kafka.frame_auth] telescopes must map each telescope to a list of principals")
        if not telescopes:
            return cls()
        _check_principals([p for ps in telescopes.values() for p in ps])
        path = env.get("BROKER_FRAME_KEYS_FILE") or table.get("keys_file")
        if not path:
            raise ConfigError("[kafka.frame_auth] telescopes needs the principals' keys (keys_file or "
                              "BROKER_FRAME_KEYS_FILE)")
        try:
            keys = tomllib.loads(read_secret(str(path), "frame keys"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"frame keys file {path}: {exc}") from exc
        missing = {p for ps in telescopes.values() for p in ps} - set(keys)
        if missing:
            raise ConfigError(f"frame keys file {path} has no key for {sorted(missing)}")
        empty = sorted(p for p, k in keys.items() if not isinstance(k, str) or not k.strip())
        if empty:  # an empty key would accept frames anyone can sign
            raise ConfigError(f"frame keys file {path}: the key of {empty} is empty or not a string")
        return cls({t: tuple(ps) for t, ps in telescopes.items()}, {p: k.encode() for p, k in keys.items()})


def may_sign(kafka: Mapping | None, principal: str | None, telescope: str) -> bool:
    """Whether the ingest stage of ``[kafka.frame_auth]`` accepts frames of ``telescope`` signed by ``principal``.

    True without a ``telescopes`` map (nothing is checked); ``principal`` None: unsigned frames. The
    signature itself is not checked here (that needs the principals' keys).
    """
    telescopes = _table(kafka).get("telescopes") or {}
    return not telescopes or (principal is not None and principal in telescopes.get(telescope, ()))


def _check_principals(principals: list) -> None:
    """ConfigError for a principal that no ``frame-auth`` header can name (``principal:signature``)."""
    bad = sorted(str(p) for p in principals if not isinstance(p, str) or not p or ":" in p)
    if bad:
        raise ConfigError(f"frame-auth principal(s) {bad} ([kafka.frame_auth] or BROKER_FRAME_SIGNER) cannot sign "
                          "frames: a name without ':' expected")


def _table(kafka: Mapping | None) -> dict:
    table = dict(kafka or {}).get("frame_auth") or {}
    if not isinstance(table, dict):
        raise ConfigError("[kafka.frame_auth] must be a table")
    unknown = set(table) - {"telescopes", "keys_file", "signer", "key_file"}
    if unknown:
        raise ConfigError(f"unknown setting(s) in [kafka.frame_auth]: {sorted(unknown)}")
    return table
