-- The reference: one payment applied by one transaction, as pgbench runs it (bench/reference.py).
-- Variables given with -D: lo, n (customer account ids lo .. lo+n-1), hot (0 = uniform buyer,
-- else the fixed buyer's id), base and stride (each client completes its own pending payments
-- base + client_id*stride + k; they wrap around after `stride`), step (starts at 0).
-- What it does is what the worker does for one payment: lock the two accounts in id order
-- (FOR NO KEY UPDATE), update both balances, insert the two ledger entries, mark the payment
-- completed, commit.
\set step :step + 1
\set pid :base + :client_id * :stride + (:step % :stride)
\set buyer :lo + random(0, :n - 1)
\if :hot > 0
\set buyer :hot
\endif
\set seller :lo + ((:buyer - :lo + random(1, :n - 1)) % :n)
BEGIN;
SELECT id FROM accounts WHERE id IN (:buyer, :seller) ORDER BY id FOR NO KEY UPDATE;
UPDATE accounts SET balance = balance - 0.01, updated_at = now() WHERE id = :buyer RETURNING balance AS buyer_after \gset
UPDATE accounts SET balance = balance + 0.01, updated_at = now() WHERE id = :seller RETURNING balance AS seller_after \gset
INSERT INTO ledger_entries (account_id, payment_id, amount, balance_after)
  VALUES (:buyer, :pid, -0.01, :buyer_after), (:seller, :pid, 0.01, :seller_after);
UPDATE payments SET status = 'completed', amount_captured = amount, completed_at = now() WHERE id = :pid;
COMMIT;
