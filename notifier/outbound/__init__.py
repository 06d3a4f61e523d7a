"""Outbound merchant webhooks: events about shipments, messages and recipients, posted
signed to the endpoints a merchant subscribes (``events``, ``sender``, ``api``)."""
