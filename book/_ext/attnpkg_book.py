"""Sphinx extension of the book: values that the pages show and must not drift, and one fix.

It fills two MyST substitutions when the book is built:

- ``{{ attnpkg_version }}`` from ``attnpkg.__version__``, so the front page names the version of
  attnpkg that the chapters were executed with;
- ``{{ repository_link }}``, a link to the repository, from ``repository.url`` in ``_config.yml``
  (the one place the repository's URL lives).

And it drops scripts that a page would include twice. sphinx-thebe (loaded by Jupyter Book) adds
its inline configuration script ``const THEBE_JS_URL = ...`` to every page twice (once with no
file name and once with an empty one), and the second ``const`` is a JavaScript error in the
reader's browser.
"""
import attnpkg


def _fill_substitutions(app, config):
    substitutions = dict(config.myst_substitutions or {})
    substitutions["attnpkg_version"] = attnpkg.__version__
    url = config.html_theme_options["repository_url"].rstrip("/")
    name = url.removeprefix("https://github.com/")
    substitutions["repository_link"] = f"[{name}]({url})"
    config.myst_substitutions = substitutions


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    seen, scripts = set(), []
    for script in context.get("script_files", []):
        # the same inline script comes once with filename None and once with filename ""
        key = (getattr(script, "filename", script) or "", tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            scripts.append(script)
    context["script_files"] = scripts


def setup(app):
    # Before myst-parser and myst-nb read their configuration (they do so on builder-inited).
    app.connect("config-inited", _fill_substitutions)
    # After the other extensions have added their scripts to the page.
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"version": attnpkg.__version__, "parallel_read_safe": True, "parallel_write_safe": True}
