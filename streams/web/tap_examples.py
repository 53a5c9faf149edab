"""The TAP service's examples (DALI 1.1 §2.3, TAP 1.1 §2): ADQL queries over the archive, served at ``/examples``.

TOPCAT lists them as *Service-provided examples* of its TAP window and STILTS ``taplint`` runs them
(stage EXA). The document is XHTML with RDFa Lite markup in the vocabulary
``http://www.ivoa.net/rdf/examples#``: each example an element ``typeof="example"`` with an ``id``
and ``resource="#id"``, its title ``property="name"``, its ADQL ``property="query"`` (plain text)
and the tables it reads ``property="table"``. Every query names the published tables and columns of
:mod:`streams.web.tap_schema`, and ``tests/streams/web/test_tap_examples.py`` runs each one against
the tests' archive, so an example cannot drift from the schema unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

#: RDFa vocabulary of the examples (DALI 1.1).
VOCABULARY = "http://www.ivoa.net/rdf/examples#"
#: Media type of the document: XHTML (DALI 1.1 allows it or text/html).
XHTML_TYPE = "application/xhtml+xml"


@dataclass(frozen=True)
class Example:
    """One example query.

    Attributes
    ----------
    id : str
        Its XML id (an anchor of the document: ``/examples#id``).
    name : str
        Its title, as TOPCAT lists it.
    description : str
        What it finds and what to change (plain text).
    query : str
        The ADQL.
    tables : tuple of str
        The published tables it reads (``broker.alerts``, ``broker.objects``; an uploaded table is not
        named: taplint's ``E-EXA-UKTB`` for a table the service does not list).
    """

    id: str
    name: str
    description: str
    query: str
    tables: tuple[str, ...]

    @property
    def needs_upload(self) -> bool:
        """Whether the query reads an uploaded table (``TAP_UPLOAD.mine``), which must be sent with it."""
        return "TAP_UPLOAD." in self.query.upper()


EXAMPLES: tuple[Example, ...] = (
    Example("recent-cone", "Alerts of the last 30 days in a cone",
            "The alerts within 0.1 deg of (RA, Dec) = (150.0, 2.0) whose exposure started at most 30 days before "
            "the archive's newest alert, newest first, with their distance from the centre in arcsec. Change the "
            "centre and radius (deg) of CIRCLE and of DISTANCE's POINT.",
            "SELECT TOP 100 a.alert_id, a.object_id, a.mjd, a.filter, a.magpsf, a.sigmapsf, a.rb, a.anomaly,\n"
            "       DISTANCE(POINT('ICRS', a.ra, a.dec), POINT('ICRS', 150.0, 2.0)) * 3600 AS sep_arcsec\n"
            "FROM broker.alerts AS a, (SELECT MAX(mjd) AS newest FROM broker.alerts) AS n\n"
            "WHERE 1 = CONTAINS(POINT('ICRS', a.ra, a.dec), CIRCLE('ICRS', 150.0, 2.0, 0.1))\n"
            "  AND a.mjd > n.newest - 30\n"
            "ORDER BY mjd DESC", ("broker.alerts",)),
    Example("newest-real", "Newest alerts most likely real",
            "The 100 newest alerts whose real/bogus score is at least 0.9 (1 = real; unscored alerts have a null "
            "rb and are left out).",
            "SELECT TOP 100 alert_id, object_id, night, telescope, mjd, ra, dec, filter, magpsf, snr, rb\n"
            "FROM broker.alerts\n"
            "WHERE rb >= 0.9\n"
            "ORDER BY mjd DESC", ("broker.alerts",)),
    Example("class-alerts", "Alerts of one light-curve class",
            "The 100 newest alerts classified as supernova-like (SN) with a probability above 0.8, with their "
            "class and its probability. The classes are those of broker/lcclass.py (SN, variable_star, AGN, "
            "nuclear_flare, mover, bogus); alerts of schema version 1 or 2, and alerts not classified, have a "
            "null class and are left out.",
            "SELECT TOP 100 alert_id, object_id, mjd, filter, magpsf, rb, class_label, class_probability\n"
            "FROM broker.alerts\n"
            "WHERE class_label = 'SN' AND class_probability > 0.8\n"
            "ORDER BY mjd DESC, alert_id", ("broker.alerts",)),
    Example("objects-box", "Objects in a box, with their newest state",
            "The objects whose mean position lies in a box of 0.5 x 0.5 deg centred on (150.0, 2.0) (ADQL 2.0's "
            "BOX: its sides are great circles), with their number of alerts, first and newest alert, newest "
            "magnitude and band, light-curve class at the newest alert and its probability, and best "
            "real/bogus and anomaly scores, most observed first.",
            "SELECT object_id, ra, dec, n_alerts, first_mjd, last_mjd, last_mag, last_band, class_label,\n"
            "       class_probability, max_rb, max_anomaly\n"
            "FROM broker.objects\n"
            "WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), BOX('ICRS', 150.0, 2.0, 0.5, 0.5))\n"
            "ORDER BY n_alerts DESC, object_id", ("broker.objects",)),
    Example("light-curve", "Light curve of one object",
            "Every detection of one object in time order: magnitude, flux and their errors, band, real/bogus "
            "score. The subquery picks the object with the most alerts; for your own object write its id "
            "instead: WHERE object_id = 'OBJ...'.",
            "SELECT alert_id, mjd, night, filter, magpsf, sigmapsf, flux, flux_err, snr, rb\n"
            "FROM broker.alerts\n"
            "WHERE object_id IN (SELECT TOP 1 object_id FROM broker.objects ORDER BY n_alerts DESC, object_id)\n"
            "ORDER BY mjd", ("broker.alerts", "broker.objects")),
    Example("anomaly-top", "Most anomalous objects",
            "The 50 objects with the highest anomaly score of any of their alerts (1 = most anomalous), among "
            "those with an alert of real/bogus score 0.5 or more.",
            "SELECT TOP 50 object_id, ra, dec, n_alerts, first_mjd, last_mjd, last_mag, last_band, max_rb,\n"
            "       max_anomaly\n"
            "FROM broker.objects\n"
            "WHERE max_rb >= 0.5 AND max_anomaly IS NOT NULL\n"
            "ORDER BY max_anomaly DESC, object_id", ("broker.objects",)),
    Example("polygon", "Alerts in a polygon",
            "The alerts inside a quadrilateral given by its vertices (RA, Dec in deg, joined by great circles; "
            "3 to 200 vertices, within 89 deg of their mean direction), in time order.",
            "SELECT alert_id, object_id, mjd, ra, dec, filter, magpsf, rb\n"
            "FROM broker.alerts\n"
            "WHERE 1 = CONTAINS(POINT('ICRS', ra, dec),\n"
            "                   POLYGON('ICRS', 149.9, 1.9, 150.1, 1.9, 150.15, 2.1, 149.95, 2.1))\n"
            "ORDER BY mjd, alert_id", ("broker.alerts",)),
    Example("upload-crossmatch", "Cross-match your own table (needs an upload)",
            "Your targets against the archive: the alerts within 2 arcsec of each row of a table you upload as "
            "'mine' (columns name, ra, dec in deg; TOPCAT: the table as TAP_UPLOAD.mine; pyvo: "
            "run_sync(query, uploads={'mine': table}); STILTS: upload1=mine.vot upname1=mine).",
            "SELECT m.name, a.alert_id, a.object_id, a.mjd, a.filter, a.magpsf, a.rb,\n"
            "       DISTANCE(POINT('ICRS', a.ra, a.dec), POINT('ICRS', m.ra, m.dec)) * 3600 AS sep_arcsec\n"
            "FROM TAP_UPLOAD.mine AS m\n"
            "JOIN broker.alerts AS a\n"
            "  ON 1 = CONTAINS(POINT('ICRS', a.ra, a.dec), CIRCLE('ICRS', m.ra, m.dec, 2.0 / 3600))\n"
            "ORDER BY name, mjd", ("broker.alerts",)),
    Example("nightly-counts", "Alerts per night and band",
            "How many alerts and objects each night and band brought, with their mean and best real/bogus score "
            "and brightest difference magnitude; newest night first.",
            "SELECT night, filter, COUNT(*) AS n_alerts, COUNT(DISTINCT object_id) AS n_objects, AVG(rb) AS mean_rb,\n"
            "       MAX(rb) AS best_rb, MIN(magpsf) AS brightest_mag\n"
            "FROM broker.alerts\n"
            "GROUP BY night, filter\n"
            "ORDER BY night DESC, filter", ("broker.alerts",)),
)


def _example_xml(example: Example) -> str:
    tables = ", ".join(f'<span property="table">{escape(t)}</span>' for t in example.tables)
    return (f'<div typeof="example" id={quoteattr(example.id)} resource={quoteattr("#" + example.id)}>'
            f'<h2 property="name">{escape(example.name)}</h2>'
            f"<p>{escape(example.description)}</p>"
            f'<pre property="query">{escape(example.query)}</pre>'
            f"<p>Tables: {tables}</p></div>\n")


def examples_xhtml(base: str) -> bytes:
    """The examples document: XHTML (well-formed XML) with the RDFa of DALI 1.1 for every :data:`EXAMPLES`.

    ``base`` is the service's URL (``.../api/v1/tap``), named in the text.
    """
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en">\n'
            "<head><title>Example ADQL queries of the alert archive</title></head>\n"
            f'<body vocab="{VOCABULARY}">\n'
            "<h1>Example ADQL queries of the alert archive</h1>\n"
            f"<p>Queries of the TAP service at {escape(base)}: run them with TOPCAT (its TAP window lists "
            "them as Service-provided examples), pyvo or STILTS. The tables and columns are described at "
            f"{escape(base)}/tables.</p>\n"
            + "".join(_example_xml(e) for e in EXAMPLES)
            + "</body>\n</html>\n").encode()
