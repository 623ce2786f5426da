-- The reconciliation queue's side of the money engine, version 1 (billing/sql/ has the rest).

DROP SCHEMA IF EXISTS reconciliation_engine CASCADE;
CREATE SCHEMA reconciliation_engine;

-- Expire one batch of due holds (billing_engine.holds_expire_batch) and queue each one nobody
-- charged as an expired-hold item, in the same statement: a hold is never expired without its
-- item. The unique (kind, request_id) index makes a second sweep of the same hold a no-op.
-- Returns the batch's counts and where the next batch starts.
CREATE FUNCTION reconciliation_engine.holds_expire_and_queue(
    p_now timestamptz, p_limit integer, p_after_at timestamptz, p_after_id bigint
) RETURNS TABLE (expired integer, queued integer, last_at timestamptz, last_id bigint)
LANGUAGE sql AS $$
    WITH expired AS MATERIALIZED (
        SELECT * FROM billing_engine.holds_expire_batch(p_now, p_limit, p_after_at, p_after_id)
    ), queued AS (
        -- An uncharged hold waits for finance; one the sweep charged from its checkpoint is
        -- recorded as resolved, so the queue shows what was charged and why.
        INSERT INTO reconciliation_reconciliationitem
            (kind, status, request_id, account_id, key_prefix, model_alias, usage, details,
             cost, held_amount, error, attempts, created_at, resolved_at, resolution_memo,
             transaction_id)
        SELECT 'expired_hold',
               CASE WHEN e.charged IS NULL THEN 'pending' ELSE 'resolved' END,
               e.request_id, e.account_id, COALESCE(k.prefix, ''), e.model_alias, '{}'::jsonb,
               jsonb_build_object('expires_at', e.expires_at,
                                  'charged_from_checkpoint', e.charged IS NOT NULL),
               e.charged, e.amount, '', 0, p_now,
               CASE WHEN e.charged IS NOT NULL THEN p_now END,
               CASE WHEN e.charged IS NULL THEN ''
                    ELSE 'charged from the last checkpoint of a gateway that died mid-stream '
                         '(estimated usage, posted late)' END,
               CASE WHEN e.charged IS NOT NULL THEN e.transaction_id END
        FROM expired AS e LEFT JOIN billing_apikey AS k ON k.id = e.api_key_id
        WHERE e.transaction_id IS NULL OR e.charged IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING 1
    ), last AS (
        SELECT e.expires_at, e.id FROM expired AS e ORDER BY e.expires_at DESC, e.id DESC LIMIT 1
    )
    SELECT (SELECT count(*)::integer FROM expired), (SELECT count(*)::integer FROM queued),
           (SELECT last.expires_at FROM last), (SELECT last.id FROM last)
$$;
