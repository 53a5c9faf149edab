"""A small portal of the tests: an archive and an object history built here, a kept frame, tokens.

Three frames of one field (F1, band r) see four objects; object 0 is seen on every frame, so it has a
light curve of three detections. Each alert is the published v3 sample with its ids, position, time
and scores changed, so that the archive's records agree with the history's detections.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from broker.archive.reader import Archive
from broker.archive.writer import ArchiveWriter
from broker.history import ObjectHistory
from streams.web.app import create_app
from streams.web.config import WebConfig
from tests.broker.test_archive import archived, commit, sample
from tests.helpers import candidate

FRAMES = ("SAMPLE-F1-r-0001", "SAMPLE-F1-r-0002", "SAMPLE-F1-r-0003")
MJDS = (60001.5, 60002.5, 60003.5)
#: (RA, Dec) (deg) of the four objects, 20-40 arcsec apart.
POSITIONS = ((150.0, 2.0), (150.01, 2.0), (150.0, 2.01), (150.02, 2.02))
#: Which objects each frame detects.
SEEN = ((0, 1), (0, 2), (0, 3))


def _alert(cand, frame_id: str, mjd: float, index: int, rb: float) -> dict:
    rec = copy.deepcopy(sample(3))
    det = cand.detection
    rec["alertId"] = rec["sourceId"] = 1000 + 10 * FRAMES.index(frame_id) + index
    rec["objectId"], rec["candid"] = cand.obj.object_id, cand.cand_id
    rec["object"].update(objectId=cand.obj.object_id, ra=cand.obj.ra, dec=cand.obj.dec, ndet=cand.obj.ndet)
    rec["source"].update(mjd=mjd, ra=det.ra, dec=det.dec, flux=det.flux, flux_err=det.flux_err, snr=det.snr,
                         x=100.0 + 10 * index, y=50.0 + 5 * index, magpsf=27.5 - 2.5 * np.log10(det.flux))
    rec["provenance"].update(frame_id=frame_id, telescope="SAMPLE", field="F1")
    rec["scores"]["rb"] = rb
    rec["prv_sources"], rec["prv_forced_sources"] = [], []
    rec["prv_nondetections"] = [{"frame_id": "SAMPLE-F1-r-0000", "mjd": 60000.5, "filter": "r",
                                 "limiting_flux": 300.0, "diffmaglim": 21.3}]
    return rec


def build_state(state_dir: Path) -> list[dict]:
    """Write the archive, history and one kept difference image into ``state_dir``; the alert records."""
    history = ObjectHistory(state_dir / "history.sqlite")
    records = []
    for f, (frame_id, mjd) in enumerate(zip(FRAMES, MJDS, strict=True)):
        cands = [candidate(f"{frame_id}/{i}", *POSITIONS[obj], flux=1000.0 * (f + 1), seed=10 * f + i)
                 for i, obj in enumerate(SEEN[f])]
        history.associate(frame_id, mjd, "r", cands, 27.5, 300.0, "SAMPLE")
        records += [_alert(c, frame_id, mjd, i, rb=0.2 + 0.3 * i + 0.1 * f) for i, c in enumerate(cands)]
    history.close()
    writer = ArchiveWriter(Archive(state_dir / "archive"))
    writer.recover()
    commit(writer, archived(records))
    kept = state_dir / "diffs" / "SAMPLE" / "F1" / "r" / FRAMES[-1]
    kept.mkdir(parents=True)
    diff = np.random.default_rng(0).normal(0, 10, (300, 400)).astype(np.float32)
    diff[:5, :5] = np.nan
    np.save(kept / "diff.npy", diff)
    (kept / "meta.json").write_text(json.dumps({"format": 1, "frame_id": FRAMES[-1], "ny": 300, "nx": 400}))
    return records


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A state folder (archive, history, diffs) and the alert records archived in it."""
    state_dir = tmp_path_factory.mktemp("state")
    return state_dir, build_state(state_dir)


@pytest.fixture
def portal_config(state, tmp_path) -> WebConfig:
    """The portal over :func:`state`, with a token file, a saved watchlists file and TAP jobs of the test's own."""
    return WebConfig.for_state_dir(state[0], tokens_path=tmp_path / "tokens.sqlite",
                                   watchlists_path=tmp_path / "watchlists.sqlite", tap_jobs_dir=tmp_path / "tap-jobs")


@pytest.fixture
def client(portal_config):
    """A TestClient of the portal; ``client.app.state.portal`` is its Portal."""
    with TestClient(create_app(portal_config)) as c:
        yield c


@pytest.fixture
def token(client):
    """A token with every scope, bound to telescope TEST (the tests' frames): ``{"Authorization": "Bearer ..."}``."""
    clear = client.app.state.portal.tokens.add("tester", ["read", "upload", "vet"], telescopes=["TEST"])
    return {"Authorization": f"Bearer {clear}"}
