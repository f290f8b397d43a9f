"""The atlas as a static site: an index by field and a page per method, from run folders.

``mlatlas tour`` writes it next to its runs; ``mlatlas site RUN_DIR...`` rebuilds it from
existing run folders (a default and a ``--full`` tour side by side). Plain HTML files with
inline CSS and relative links to the runs' PNG figures: they open from ``file://``, offline,
with no server and no script. :mod:`mlatlas.site.runs` reads the runs' ``metrics.json``;
:mod:`mlatlas.site.builder` renders the Jinja2 templates in ``templates/``.
"""
