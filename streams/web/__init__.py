"""The web portal: one FastAPI application over the archive and the object history (``broker serve``).

HTTP runtime only; the science it serves and runs stays in ``broker/``. Modules, one concern each:

- :mod:`~streams.web.config`: :class:`~streams.web.config.WebConfig`, the portal's frozen settings;
- :mod:`~streams.web.app`: :func:`~streams.web.app.create_app`, the application and its shared
  :class:`~streams.web.app.Portal` (archive, history, tokens), error handling, CORS, size limits;
- :mod:`~streams.web.tokens`: hashed API tokens and their scopes (``read``, ``upload``, ``vet``);
- :mod:`~streams.web.limits`: the limits of costly requests (a budget of work per client, a bound
  on the work in hand) and the uploads' rate limiter;
- :mod:`~streams.web.api`: the read-only REST API under ``/api/v1/`` (alerts, objects, cone
  search, frames, cutouts, health, metrics);
- :mod:`~streams.web.queries`: its reads of the archive (a DuckDB view kept open per thread) and the history;
- :mod:`~streams.web.records`: alert records as the API shows them (summaries, light curves, cursors);
- :mod:`~streams.web.render`: PNGs of cutouts, frames, triplets and attribution maps;
- :mod:`~streams.web.upload`: ``POST /api/v1/frames``: upload a FITS frame to publish or predict;
- :mod:`~streams.web.vo`: the archive as an IVOA Simple Cone Search (``/api/v1/scs``);
- :mod:`~streams.web.watchlists`: ``POST /api/v1/crossmatch``: a watchlist against the archive;
- :mod:`~streams.web.lightcurves`: an object's light curve as JSON, CSV or a VOTable;
- :mod:`~streams.web.pages`, :mod:`~streams.web.live`, :mod:`~streams.web.vetting`: the HTML pages,
  the live alert stream and the vetting of candidates.
"""
