"""What the API and the worker share: settings, schema, money, routing and the ledger rules."""
