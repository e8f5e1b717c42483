#!/bin/sh
# Patroni's bootstrap.post_init: run once, on the first primary, with a superuser connection
# string. The service's role and database (replicated to the other nodes like everything else).
set -eu
psql -v ON_ERROR_STOP=1 "$1" <<SQL
CREATE ROLE wallet LOGIN PASSWORD '${WALLET_DB_PASSWORD:-wallet}';
CREATE DATABASE wallet OWNER wallet;
SQL
