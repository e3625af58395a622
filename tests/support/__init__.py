"""Helpers shared by the tests, grouped by topic; fixtures stay in the conftest.py files.

Test modules (and bench/ scripts) import from here, never from a conftest:

- ``env``: the repository root and this test process's xdist worker.
- ``net``: ``free_port``; ``db``: ``connect`` (asyncpg, as the tables' owner).
- ``tenants``: ``TenantKey`` and the ``make_tenant`` / ``make_api_key`` fixture types.
- ``runs``: workflows and runs over the REST API (``create_workflow``, ``start_run``, ``wait_run``...).
- ``workers``: ``FAST`` engine settings and ``WorkerProcess`` (``steward worker`` as a subprocess).
- ``tools``, ``providers``: registering tools and model providers over the REST API.
- ``oidc``, ``signin``: the test OpenID provider and signing in through it as a browser would.
- ``audit``: appending, reading and tampering with the audit chain.
- ``hostile``: the API in a child process and the tenant the hostile-input tests attack.
- ``servers``, ``outages``: private PostgreSQL/Redis servers to stop and start, and the outage helpers.
"""
