"""The analyst console: server-rendered pages under ``/console`` for reviewing decisions, labelling their
outcomes, trying a rules.yaml on logged decisions and watching the model registry.

A floor of its own, right below ``api/`` (which mounts its router): access (login, CSRF) in access.py,
what each page shows in pages.py, thin routes in routes.py, Jinja2 templates (autoescaped) and static
files served by the app itself (no CDN, no build step).
"""
