"""The dashboard: pages for people, over the same services and permissions as the REST API."""
