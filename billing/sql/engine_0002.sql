-- The money engine, version 2: every write to ledger rows, holds and cached balances.
--
-- Each operation is one function, called in one round trip (billing/services/ call them and map
-- their result codes to the typed errors of billing/errors.py). A refusal writes nothing. The
-- schema is dropped and created whole by each version's file, so a migration installs a
-- version by running its file and goes back by running the previous one.
--
-- Lock order, everywhere: the hold row, then account rows by ascending id, then the API key
-- row. A new posting's rows (transaction, legs, usage record) are written before any account
-- row is locked, so the contended account lock is held only from its UPDATE to COMMIT.
--
-- Money is bigint units of 1e-10 USD (billing/money.py). System accounts have fixed ids
-- (billing.models.SYSTEM_ACCOUNT_IDS; tests/billing/test_engine.py checks they agree):
-- revenue -1, promotions -2, write-offs -3, payments -4.

DROP SCHEMA IF EXISTS billing_engine CASCADE;
CREATE SCHEMA billing_engine;

-- What a hold operation returns: a result code, a detail (a state, a status), what the request's
-- posting charged the customer (settles and finance postings), and the hold as it now is.
CREATE TYPE billing_engine.hold_result AS (
    result text,
    detail text,
    charged bigint,
    id bigint,
    request_id varchar,
    account_id bigint,
    api_key_id bigint,
    model_alias varchar,
    amount bigint,
    budgeted boolean,
    state varchar,
    created_at timestamptz,
    expires_at timestamptz,
    resolved_at timestamptz,
    settled_amount bigint,
    is_overrun boolean,
    is_late boolean,
    checkpoint_cost bigint,
    checkpoint_usage jsonb,
    checkpoint_at timestamptz,
    transaction_id bigint
);

CREATE FUNCTION billing_engine.hold_out(
    p_result text, p_detail text, p_charged bigint, h billing_hold
) RETURNS billing_engine.hold_result LANGUAGE plpgsql IMMUTABLE AS $$
-- PL/pgSQL: a SQL function returning a row is never inlined, and before PostgreSQL 18 it was
-- parsed and planned on every call (a sixth of a hold and settle's server time).
BEGIN
    RETURN ROW(p_result, p_detail, p_charged, h.id, h.request_id, h.account_id, h.api_key_id,
        h.model_alias, h.amount, h.budgeted, h.state, h.created_at, h.expires_at,
        h.resolved_at, h.settled_amount, h.is_overrun, h.is_late, h.checkpoint_cost,
        h.checkpoint_usage, h.checkpoint_at, h.transaction_id)::billing_engine.hold_result;
END;
$$;

-- The wire format of an amount: a plain decimal with all ten places (billing.money.money_str).
CREATE FUNCTION billing_engine.money_text(p_units bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_units::numeric * 0.0000000001)::text  -- exact: scale 10, no division
$$;

-- A JSON string as Python's json.dumps writes it (ensure_ascii): besides the escapes to_json
-- makes, every character outside space..tilde as \uXXXX (a surrogate pair above U+FFFF).
CREATE FUNCTION billing_engine.json_ascii(p_text text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_out text := '"';
    v_char text;
    v_code integer;
BEGIN
    IF p_text ~ '^[ -~]*$' THEN
        RETURN to_json(p_text)::text;  -- the common case: no character needs \u
    END IF;
    FOREACH v_char IN ARRAY regexp_split_to_array(p_text, '') LOOP
        v_code := ascii(v_char);
        v_out := v_out || CASE
            WHEN v_char = '"' THEN '\"'
            WHEN v_char = '\' THEN '\\'
            WHEN v_code = 10 THEN '\n'
            WHEN v_code = 13 THEN '\r'
            WHEN v_code = 9 THEN '\t'
            WHEN v_code = 8 THEN '\b'
            WHEN v_code = 12 THEN '\f'
            WHEN v_code BETWEEN 32 AND 126 THEN v_char
            WHEN v_code > 65535 THEN
                '\u' || lpad(to_hex(55296 + ((v_code - 65536) >> 10)), 4, '0')
                || '\u' || lpad(to_hex(56320 + ((v_code - 65536) & 1023)), 4, '0')
            ELSE '\u' || lpad(to_hex(v_code), 4, '0')
        END;
    END LOOP;
    RETURN v_out || '"';
END;
$$;

-- The identity of a posting's money effect: SHA-256 of canonical JSON (sorted keys, no spaces;
-- legs sorted by account id, then amount). A replay under the same idempotency key must match
-- it; memo and author may differ. Its bytes never change: stored hashes depend on them.
CREATE FUNCTION billing_engine.posting_hash(
    p_kind text, p_account_ids bigint[], p_amounts bigint[], p_request_id text, p_reverses_id bigint
) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
-- PL/pgSQL, not SQL: before PostgreSQL 18 a SQL function that cannot be inlined is planned
-- again on every call, and this one runs with every posting.
BEGIN
    RETURN encode(sha256(convert_to(
        '{"kind":' || to_json(p_kind)::text
        || ',"legs":[' || (
            SELECT string_agg(
                '[' || leg.account_id || ',' || to_json(billing_engine.money_text(leg.units))::text
                || ']',
                ',' ORDER BY leg.account_id, billing_engine.money_text(leg.units) COLLATE "C")
            FROM unnest(p_account_ids, p_amounts) AS leg(account_id, units))
        || '],"request_id":' || billing_engine.json_ascii(p_request_id)
        || ',"reverses":' || COALESCE(p_reverses_id::text, 'null') || '}',
        'UTF8')), 'hex');
END;
$$;

-- The one key of every posting that charges or writes off a request.
CREATE FUNCTION billing_engine.request_key(p_request_id text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'request:' || p_request_id $$;

-- Start (UTC) of the budget period containing p_now: day, ISO week (Monday) or month.
CREATE FUNCTION billing_engine.period_start(p_period text, p_now timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT CASE p_period
        WHEN 'day' THEN date_trunc('day', p_now, 'UTC')
        WHEN 'week' THEN date_trunc('week', p_now, 'UTC')
        WHEN 'month' THEN date_trunc('month', p_now, 'UTC')
    END
$$;

-- An outbox row (billing_notification) for the account: delivered by Celery
-- (billing/payments/tasks.py) to its webhook and billing email, in the caller's transaction.
CREATE FUNCTION billing_engine.notification_write(
    p_account_id bigint, p_type text, p_figures jsonb, p_now timestamptz
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO billing_notification (account_id, type, payload, created_at)
    VALUES (p_account_id, p_type,
        jsonb_build_object('type', p_type, 'account_id', p_account_id,
                           'created_at', to_char(p_now AT TIME ZONE 'UTC',
                                                 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        || p_figures,
        p_now)
$$;

-- Whether a balance move needs account_thresholds_cross: an armed threshold the available
-- balance is now below, a disarmed one it is back at or above, or a credit while
-- balance.depleted is disarmed. Inlined into posting_write's UPDATE ... RETURNING: for an
-- account with no threshold and nothing disarmed it is a few null and boolean tests.
CREATE FUNCTION billing_engine.thresholds_crossed(
    p_balance bigint, p_held bigint, p_delta bigint, p_low_threshold bigint, p_low_armed boolean,
    p_topup_enabled boolean, p_topup_threshold bigint, p_topup_armed boolean,
    p_depleted_armed boolean
) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT COALESCE(
        (p_low_threshold IS NOT NULL
         AND (p_balance::numeric - p_held < p_low_threshold) = p_low_armed)
        OR (p_topup_enabled AND p_topup_threshold IS NOT NULL
            AND (p_balance::numeric - p_held < p_topup_threshold) = p_topup_armed)
        OR (NOT p_depleted_armed AND p_delta > 0), false)
$$;

-- The account's balance crossed one of its thresholds (posting_write saw it in the UPDATE that
-- moved the balance, so the row is locked and this runs once per crossing): below the
-- low-balance threshold, a balance.low event; below the auto top-up threshold, one pending
-- auto top-up attempt (charged by a Celery task). At or above a threshold again, it re-arms;
-- a credit re-arms balance.depleted (billing_engine.balance_depleted_record).
CREATE FUNCTION billing_engine.account_thresholds_cross(
    p_account_id bigint, p_delta bigint, p_now timestamptz
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    a billing_account;
    v_available numeric;
    v_low_armed boolean;
    v_topup_armed boolean;
BEGIN
    SELECT * INTO a FROM billing_account WHERE id = p_account_id;
    v_available := a.balance::numeric - a.held;
    v_low_armed := a.low_balance_armed;
    v_topup_armed := a.auto_topup_armed;
    IF a.low_balance_threshold IS NOT NULL THEN
        IF a.low_balance_armed AND v_available < a.low_balance_threshold THEN
            PERFORM billing_engine.notification_write(p_account_id, 'balance.low',
                jsonb_build_object(
                    'available', billing_engine.money_text(v_available::bigint),
                    'balance', billing_engine.money_text(a.balance),
                    'threshold', billing_engine.money_text(a.low_balance_threshold)),
                p_now);
            v_low_armed := false;
        ELSIF NOT a.low_balance_armed AND v_available >= a.low_balance_threshold THEN
            v_low_armed := true;
        END IF;
    END IF;
    IF a.auto_topup_enabled AND a.auto_topup_threshold IS NOT NULL THEN
        IF a.auto_topup_armed AND v_available < a.auto_topup_threshold
           AND a.auto_topup_amount > 0 THEN
            INSERT INTO billing_autotopupattempt (account_id, amount, status, payment_intent_id,
                failure_reason, created_at, updated_at)
            VALUES (p_account_id, a.auto_topup_amount, 'pending', '', '', p_now, p_now);
            v_topup_armed := false;
        ELSIF NOT a.auto_topup_armed AND v_available >= a.auto_topup_threshold THEN
            v_topup_armed := true;
        END IF;
    END IF;
    UPDATE billing_account
    SET low_balance_armed = v_low_armed, auto_topup_armed = v_topup_armed,
        depleted_armed = depleted_armed OR p_delta > 0
    WHERE id = p_account_id
      AND (low_balance_armed, auto_topup_armed, depleted_armed)
          IS DISTINCT FROM (v_low_armed, v_topup_armed, depleted_armed OR p_delta > 0);
END;
$$;

-- A request refused for funds (402): one balance.depleted event per crossing, re-armed by the
-- next credit. Called by billing/services/holds.py as its own statement (the refusal wrote
-- nothing); writes nothing for an account already told or with nowhere to tell.
CREATE FUNCTION billing_engine.balance_depleted_record(
    p_account_id bigint, p_amount bigint, p_now timestamptz
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    a record;
BEGIN
    UPDATE billing_account SET depleted_armed = false
    WHERE id = p_account_id AND depleted_armed AND (webhook_url <> '' OR billing_email <> '')
    RETURNING balance, held INTO a;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM billing_engine.notification_write(p_account_id, 'balance.depleted',
        jsonb_build_object(
            'available', billing_engine.money_text(a.balance - a.held),
            'balance', billing_engine.money_text(a.balance),
            'requested', billing_engine.money_text(p_amount)),
        p_now);
    RETURN true;
END;
$$;

-- Write one balanced posting and move the cached balances it justifies; `p_release` also lowers
-- `held` on `p_release_account` (a settle releases its hold as it posts). Returns the new
-- transaction's id, or NULL when a unique key (the idempotency key, or a transaction's one
-- reversal) is taken: then nothing was written. Callers have validated the legs.
CREATE FUNCTION billing_engine.posting_write(
    p_kind text, p_idempotency_key text, p_account_ids bigint[], p_amounts bigint[],
    p_occurred_at timestamptz, p_now timestamptz, p_request_id text, p_memo text,
    p_posted_by bigint, p_reverses_id bigint, p_model_alias text, p_is_overrun boolean,
    p_is_late boolean, p_release_account bigint, p_release bigint
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    v_account record;
    v_delta bigint;
    v_crossed boolean;
BEGIN
    -- The transaction row first: its unique key queues concurrent replays there, never on an
    -- account row.
    INSERT INTO billing_ledgertransaction (kind, idempotency_key, content_hash, request_id, memo,
        posted_by_id, occurred_at, posted_at, reverses_id, model_alias, is_overrun, is_late)
    VALUES (p_kind, p_idempotency_key,
        billing_engine.posting_hash(p_kind, p_account_ids, p_amounts, p_request_id, p_reverses_id),
        p_request_id, p_memo, p_posted_by, p_occurred_at, p_now, p_reverses_id, p_model_alias,
        p_is_overrun, p_is_late)
    ON CONFLICT DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO billing_ledgerleg (transaction_id, account_id, amount)
    SELECT v_id, leg.account_id, leg.units FROM unnest(p_account_ids, p_amounts) AS leg(account_id, units);
    -- Customer rows only (system accounts keep no cached balance: they would be a hot row), in
    -- ascending id order, so two postings can never deadlock on them. The common posting (a
    -- usage, a credit) has two legs, one of them a customer's: one UPDATE, no aggregate.
    IF cardinality(p_account_ids) = 2 AND (p_account_ids[1] > 0) <> (p_account_ids[2] > 0)
       AND (p_release = 0 OR p_release_account = greatest(p_account_ids[1], p_account_ids[2]))
    THEN
        v_delta := CASE WHEN p_account_ids[1] > 0 THEN p_amounts[1] ELSE p_amounts[2] END;
        UPDATE billing_account
        SET balance = balance + v_delta, held = held - p_release
        WHERE id = greatest(p_account_ids[1], p_account_ids[2])
        RETURNING billing_engine.thresholds_crossed(balance, held, v_delta, low_balance_threshold,
            low_balance_armed, auto_topup_enabled, auto_topup_threshold, auto_topup_armed,
            depleted_armed) INTO v_crossed;
        IF v_crossed THEN
            PERFORM billing_engine.account_thresholds_cross(
                greatest(p_account_ids[1], p_account_ids[2]), v_delta, p_now);
        END IF;
        RETURN v_id;
    END IF;
    FOR v_account IN
        SELECT moved.account_id, sum(moved.delta) AS delta, sum(moved.release) AS release
        FROM (
            SELECT leg.account_id, leg.units AS delta, 0::bigint AS release
            FROM unnest(p_account_ids, p_amounts) AS leg(account_id, units)
            UNION ALL
            SELECT p_release_account, 0, p_release WHERE p_release > 0
        ) AS moved
        WHERE moved.account_id > 0
        GROUP BY moved.account_id
        ORDER BY moved.account_id
    LOOP
        UPDATE billing_account
        SET balance = balance + v_account.delta, held = held - v_account.release
        WHERE id = v_account.account_id
        RETURNING billing_engine.thresholds_crossed(balance, held, v_account.delta::bigint,
            low_balance_threshold, low_balance_armed, auto_topup_enabled, auto_topup_threshold,
            auto_topup_armed, depleted_armed) INTO v_crossed;
        IF v_crossed THEN
            PERFORM billing_engine.account_thresholds_cross(
                v_account.account_id, v_account.delta::bigint, p_now);
        END IF;
    END LOOP;
    RETURN v_id;
END;
$$;

-- What a refund may still return to a customer account: the usage charged to it plus its
-- purchases, less the refunds already posted to it, never below zero. A reversal counts as the
-- kind it reverses (a reversed usage was not charged, a reversed refund returned nothing);
-- grants, adjustments and anything else do not count. A refund that debits the customer is
-- money paid back out through the provider (a card refund, a lost dispute: billing/payments/):
-- it lowers what was purchased, as its reversal (a dispute won) restores it.
CREATE FUNCTION billing_engine.account_refundable(p_account_id bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT GREATEST(COALESCE(sum(CASE
        WHEN COALESCE(reversed.kind, t.kind) = 'purchase' THEN l.amount
        WHEN COALESCE(reversed.kind, t.kind) = 'refund'
             AND (l.amount < 0) = (t.reverses_id IS NULL) THEN l.amount  -- paid back out
        ELSE -l.amount  -- usage debits the customer; a refund credits it
    END), 0), 0)::bigint
    FROM billing_ledgerleg AS l
    JOIN billing_ledgertransaction AS t ON t.id = l.transaction_id
    LEFT JOIN billing_ledgertransaction AS reversed ON reversed.id = t.reverses_id
    WHERE l.account_id = p_account_id
      AND COALESCE(reversed.kind, t.kind) IN ('usage', 'purchase', 'refund')
$$;

-- A posting from its legs (grants, purchases, refunds, adjustments, reversals): 'posted',
-- 'replayed' (the same key with the same content), 'conflict' (the same key, other content),
-- 'already_reversed', 'unbalanced', 'account_missing' (a leg names no customer account) or
-- 'refund_exceeds_paid' (a refund beyond billing_engine.account_refundable; o_transaction_id
-- then carries the refundable units instead of an id).
CREATE FUNCTION billing_engine.ledger_post(
    p_kind text, p_idempotency_key text, p_account_ids bigint[], p_amounts bigint[],
    p_occurred_at timestamptz, p_now timestamptz, p_request_id text, p_memo text,
    p_posted_by bigint, p_reverses_id bigint
) RETURNS TABLE (o_result text, o_transaction_id bigint) LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    v_existing record;
    v_refund record;
BEGIN
    IF cardinality(p_account_ids) < 2 OR cardinality(p_account_ids) <> cardinality(p_amounts)
        OR 0 = ANY(p_amounts)
        OR (SELECT sum(units) FROM unnest(p_amounts) AS units) <> 0 THEN
        RETURN QUERY SELECT 'unbalanced'::text, NULL::bigint;
        RETURN;
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(p_account_ids) AS leg(account_id)
        WHERE NOT EXISTS (SELECT 1 FROM billing_account AS a
                          WHERE a.id = leg.account_id
                            AND (a.kind = 'customer') = (leg.account_id > 0))
    ) THEN
        RETURN QUERY SELECT 'account_missing'::text, NULL::bigint;
        RETURN;
    END IF;
    -- A refund returns at most what the customer was charged or paid. Its customer's row is
    -- locked first (a refund's one customer account, before any row is written: the lock order
    -- holds), so a concurrent refund waits here and then sees this one's legs. A replay (its
    -- key already posted, seen once the lock is ours) is not bounded again: it posts nothing.
    IF p_kind = 'refund' THEN
        PERFORM 1 FROM billing_account AS a
        WHERE a.id IN (SELECT leg.account_id FROM unnest(p_account_ids) AS leg(account_id)
                       WHERE leg.account_id > 0)
        ORDER BY a.id
        FOR UPDATE;
        IF NOT EXISTS (SELECT 1 FROM billing_ledgertransaction AS t
                       WHERE t.idempotency_key = p_idempotency_key) THEN
            SELECT refund.units, billing_engine.account_refundable(refund.account_id) AS refundable
            INTO v_refund
            FROM (SELECT leg.account_id, sum(leg.units) AS units
                  FROM unnest(p_account_ids, p_amounts) AS leg(account_id, units)
                  WHERE leg.account_id > 0
                  GROUP BY leg.account_id) AS refund
            WHERE refund.units > billing_engine.account_refundable(refund.account_id)
            ORDER BY refund.account_id
            LIMIT 1;
            IF FOUND THEN
                RETURN QUERY SELECT 'refund_exceeds_paid'::text, v_refund.refundable;
                RETURN;
            END IF;
        END IF;
    END IF;
    v_id := billing_engine.posting_write(p_kind, p_idempotency_key, p_account_ids, p_amounts,
        p_occurred_at, p_now, p_request_id, p_memo, p_posted_by, p_reverses_id, '', false, false,
        NULL, 0);
    IF v_id IS NOT NULL THEN
        RETURN QUERY SELECT 'posted'::text, v_id;
        RETURN;
    END IF;
    SELECT t.id, t.content_hash INTO v_existing
    FROM billing_ledgertransaction AS t WHERE t.idempotency_key = p_idempotency_key;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'already_reversed'::text, NULL::bigint;
    ELSIF v_existing.content_hash = billing_engine.posting_hash(
            p_kind, p_account_ids, p_amounts, p_request_id, p_reverses_id) THEN
        RETURN QUERY SELECT 'replayed'::text, v_existing.id;
    ELSE
        RETURN QUERY SELECT 'conflict'::text, v_existing.id;
    END IF;
END;
$$;

-- The mirror image of a posting, once: entries are never edited; this is the correction.
CREATE FUNCTION billing_engine.transaction_reverse(
    p_transaction_id bigint, p_idempotency_key text, p_memo text, p_posted_by bigint,
    p_now timestamptz
) RETURNS TABLE (o_result text, o_transaction_id bigint) LANGUAGE plpgsql AS $$
DECLARE
    v_request_id text;
    v_account_ids bigint[];
    v_amounts bigint[];
BEGIN
    SELECT t.request_id INTO v_request_id
    FROM billing_ledgertransaction AS t WHERE t.id = p_transaction_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::bigint;
        RETURN;
    END IF;
    SELECT array_agg(l.account_id ORDER BY l.id), array_agg(-l.amount ORDER BY l.id)
    INTO v_account_ids, v_amounts
    FROM billing_ledgerleg AS l WHERE l.transaction_id = p_transaction_id;
    RETURN QUERY SELECT * FROM billing_engine.ledger_post('reversal', p_idempotency_key,
        v_account_ids, v_amounts, p_now, p_now, v_request_id, p_memo, p_posted_by,
        p_transaction_id);
END;
$$;

-- Move a budgeted hold's amount out of its key's budget_held, and what it cost into
-- budget_spent (rolled over to the current period first: the lazy rollover).
CREATE FUNCTION billing_engine.budget_release(
    h billing_hold, p_release bigint, p_spent bigint, p_now timestamptz
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_key record;
    v_percent integer;
BEGIN
    IF NOT h.budgeted OR h.api_key_id IS NULL OR (p_release = 0 AND p_spent = 0) THEN
        RETURN;
    END IF;
    UPDATE billing_apikey AS k
    SET budget_held = k.budget_held - p_release,
        budget_spent = CASE
            WHEN p_spent = 0 OR k.budget_period = '' THEN k.budget_spent
            WHEN k.budget_period_start = billing_engine.period_start(k.budget_period, p_now)
                THEN k.budget_spent + p_spent
            ELSE p_spent END,
        budget_period_start = CASE
            WHEN p_spent = 0 OR k.budget_period = '' THEN k.budget_period_start
            ELSE billing_engine.period_start(k.budget_period, p_now) END
    WHERE k.id = h.api_key_id
    RETURNING k.budget_limit, k.budget_spent, k.budget_period_start INTO v_key;
    -- key.budget_threshold: once per level the spend crossed in this period (before this
    -- charge it was budget_spent - p_spent: after a rollover, zero).
    IF p_spent > 0 AND v_key.budget_limit > 0 THEN
        FOR v_percent IN
            SELECT level FROM unnest(ARRAY[50, 80, 100]) AS level
            WHERE (v_key.budget_spent - p_spent)::numeric * 100 < v_key.budget_limit::numeric * level
              AND v_key.budget_spent::numeric * 100 >= v_key.budget_limit::numeric * level
        LOOP
            PERFORM billing_engine.notification_write(h.account_id, 'key.budget_threshold',
                jsonb_build_object(
                    'api_key_id', h.api_key_id,
                    'percent', v_percent,
                    'spent', billing_engine.money_text(v_key.budget_spent),
                    'budget_limit', billing_engine.money_text(v_key.budget_limit),
                    'period_start', to_char(v_key.budget_period_start AT TIME ZONE 'UTC',
                                            'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
                p_now);
        END LOOP;
    END IF;
END;
$$;

-- Place a hold of p_amount for a request: 'placed', 'replayed' (this request's hold, same
-- account and amount), 'conflict', or a refusal that wrote nothing: 'invalid_amount',
-- 'key_inactive' (detail: missing, revoked, expired), 'account_missing', 'account_inactive'
-- (detail: the status), 'insufficient_funds', 'budget_exceeded'.
-- available = balance - held may not go below -overdraft. A key with a budget also needs
-- budget_limit >= spent in the current period + held + p_amount.
-- Two statements when it is placed: the hold row, inserted only for a live key of the account,
-- and the account's conditional UPDATE. A refusal undoes the hold row before it says why.
CREATE FUNCTION billing_engine.hold_place(
    p_request_id text, p_account_id bigint, p_api_key_id bigint, p_model_alias text,
    p_amount bigint, p_now timestamptz, p_expires_at timestamptz
) RETURNS billing_engine.hold_result LANGUAGE plpgsql AS $$
DECLARE
    h billing_hold;
    k record;
    a record;
    v_start timestamptz;
BEGIN
    IF p_amount > 0 THEN
        -- Lock order: the hold row first (a concurrent place of the same request waits here),
        -- written only for a live key of this account...
        INSERT INTO billing_hold (request_id, account_id, api_key_id, model_alias, amount,
            budgeted, state, created_at, expires_at, is_overrun, is_late)
        SELECT p_request_id, p_account_id, p_api_key_id, p_model_alias, p_amount,
            ak.budget_limit IS NOT NULL, 'active', p_now, p_expires_at, false, false
        FROM billing_apikey AS ak
        WHERE ak.id = p_api_key_id AND ak.account_id = p_account_id AND ak.status = 'active'
          AND (ak.expires_at IS NULL OR ak.expires_at > p_now)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING * INTO h;
    END IF;
    IF h.id IS NULL THEN
        -- Not written: a retry gets its hold back before any check (even an exhausted account
        -- or a key revoked since replays), else the refusal says why.
        SELECT * INTO h FROM billing_hold WHERE request_id = p_request_id;
        IF FOUND THEN
            RETURN billing_engine.hold_out(
                CASE WHEN h.account_id = p_account_id AND h.amount = p_amount
                     THEN 'replayed' ELSE 'conflict' END, NULL, NULL, h);
        ELSIF p_amount <= 0 THEN
            RETURN billing_engine.hold_out('invalid_amount', NULL, NULL, NULL);
        END IF;
        SELECT ak.status, ak.expires_at, ak.account_id INTO k
        FROM billing_apikey AS ak WHERE ak.id = p_api_key_id;
        RETURN billing_engine.hold_out('key_inactive',
            CASE WHEN NOT FOUND OR k.account_id <> p_account_id THEN 'missing'
                 WHEN k.status <> 'active' THEN k.status
                 ELSE 'expired' END, NULL, NULL);
    END IF;
    -- ...then the account: the conditional UPDATE is the check, no read-then-write race.
    -- numeric: a large overdraft plus a large balance would overflow bigint.
    UPDATE billing_account AS acc SET held = acc.held + p_amount
    WHERE acc.id = p_account_id AND acc.kind = 'customer' AND acc.status = 'active'
      AND acc.balance::numeric - acc.held - p_amount >= -acc.overdraft::numeric;
    IF NOT FOUND THEN
        DELETE FROM billing_hold WHERE id = h.id;
        SELECT acc.status, acc.kind INTO a FROM billing_account AS acc WHERE acc.id = p_account_id;
        RETURN billing_engine.hold_out(
            CASE WHEN NOT FOUND OR a.kind <> 'customer' THEN 'account_missing'
                 WHEN a.status <> 'active' THEN 'account_inactive'
                 ELSE 'insufficient_funds' END,
            CASE WHEN FOUND AND a.kind = 'customer' AND a.status <> 'active' THEN a.status END,
            NULL, NULL);
    END IF;
    -- ...then the key's budget, rolled over to the current period first.
    IF h.budgeted THEN
        SELECT ak.budget_period INTO k FROM billing_apikey AS ak WHERE ak.id = p_api_key_id;
        v_start := billing_engine.period_start(k.budget_period, p_now);
        UPDATE billing_apikey AS ak
        SET budget_spent = CASE WHEN ak.budget_period_start = v_start THEN ak.budget_spent
                                ELSE 0 END,
            budget_period_start = v_start,
            budget_held = ak.budget_held + p_amount
        WHERE ak.id = p_api_key_id
          AND (ak.budget_limit IS NULL
               OR ak.budget_limit::numeric >= CASE WHEN ak.budget_period_start = v_start
                                           THEN ak.budget_spent ELSE 0 END
                                      + ak.budget_held + p_amount);
        IF NOT FOUND THEN
            UPDATE billing_account AS acc SET held = acc.held - p_amount
            WHERE acc.id = p_account_id;
            DELETE FROM billing_hold WHERE id = h.id;
            RETURN billing_engine.hold_out('budget_exceeded', NULL, NULL, NULL);
        END IF;
    END IF;
    RETURN billing_engine.hold_out('placed', NULL, NULL, h);
END;
$$;

-- Post p_cost as the request's usage and resolve its hold: what a settle and a finance charge
-- share. The caller holds the hold's row lock. Late when the hold had already expired, or its
-- expiry has passed; an overrun when the cost is more than was held (posted in full, flagged,
-- never dropped). Returns the hold as it now is, or NULL when the request's key is taken by
-- another posting (then nothing was written).
CREATE FUNCTION billing_engine.hold_charge(
    h billing_hold, p_cost bigint, p_now timestamptz, p_memo text, p_posted_by bigint
) RETURNS billing_hold LANGUAGE plpgsql AS $$
DECLARE
    v_late boolean := h.state <> 'active' OR p_now >= h.expires_at;
    v_release bigint := CASE WHEN h.state = 'active' THEN h.amount ELSE 0 END;
    v_txn bigint;
BEGIN
    IF p_cost > 0 THEN
        v_txn := billing_engine.posting_write('usage', billing_engine.request_key(h.request_id),
            ARRAY[h.account_id, -1], ARRAY[-p_cost, p_cost], h.created_at, p_now, h.request_id,
            p_memo, p_posted_by, NULL, h.model_alias, p_cost > h.amount, v_late,
            h.account_id, v_release);
        IF v_txn IS NULL THEN
            RETURN NULL;
        END IF;
    ELSIF v_release > 0 THEN
        UPDATE billing_account SET held = held - v_release WHERE id = h.account_id;
    END IF;
    -- A hold ends once: an expired one stays expired, its late usage recorded on it.
    UPDATE billing_hold
    SET state = CASE WHEN state = 'active' THEN 'settled' ELSE state END,
        resolved_at = CASE WHEN state = 'active' THEN p_now ELSE resolved_at END,
        settled_amount = p_cost, is_overrun = p_cost > amount, is_late = v_late,
        transaction_id = v_txn
    WHERE id = h.id
    RETURNING * INTO h;
    PERFORM billing_engine.budget_release(h, v_release, p_cost, p_now);
    RETURN h;
END;
$$;

-- What the request's posting took from the customer: its usage, or nothing for a write-off.
CREATE FUNCTION billing_engine.posting_charged(p_transaction_id bigint, p_account_id bigint)
RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT COALESCE(-sum(l.amount), 0)::bigint FROM billing_ledgerleg AS l
    WHERE l.transaction_id = p_transaction_id AND l.account_id = p_account_id
$$;

-- The usage record of a request, written as its hold resolves (skipped when p_endpoint is NULL).
-- p_provider_cost is what the request cost us upstream (NULL: the model has no provider price);
-- recorded beside the cost, never posted.
CREATE FUNCTION billing_engine.usage_record_write(
    h billing_hold, p_status text, p_cost bigint, p_provider_cost bigint, p_now timestamptz,
    p_input_tokens integer, p_cached_input_tokens integer, p_cache_write_tokens integer,
    p_output_tokens integer, p_reasoning_tokens integer, p_estimated boolean,
    p_endpoint text, p_stream boolean, p_outcome text, p_started_at timestamptz,
    p_first_byte_ms integer, p_duration_ms integer
) RETURNS void LANGUAGE plpgsql AS $$
-- PL/pgSQL, whose plans are kept per session: a SQL function's INSERT was planned every call.
BEGIN
    IF p_endpoint IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO billing_usagerecord (request_id, account_id, api_key_id, model_alias, endpoint,
        stream, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
        reasoning_tokens, estimated, cost, provider_cost, status, outcome, started_at,
        first_byte_ms, duration_ms, created_at)
    VALUES (h.request_id, h.account_id, h.api_key_id, h.model_alias, p_endpoint, p_stream,
        p_input_tokens, p_cached_input_tokens, p_cache_write_tokens, p_output_tokens,
        p_reasoning_tokens, p_estimated, p_cost, p_provider_cost, p_status, p_outcome,
        p_started_at, p_first_byte_ms, p_duration_ms, p_now)
    -- A record never stops the money: a second one for the request is simply not written.
    ON CONFLICT (request_id) DO NOTHING;
END;
$$;

-- Settle a request's hold at its exact cost: 'settled' (flags on the hold: is_overrun, is_late),
-- 'replayed' (settled before at this cost), 'conflict' (settled before at another cost),
-- 'already_posted' (finance charged or wrote the request off first: `charged` says what the
-- customer paid), 'already_released', 'not_found' or 'invalid_amount'. A late settle, after
-- the sweep expired the hold, still posts the usage once.
CREATE FUNCTION billing_engine.hold_settle(
    p_request_id text, p_cost bigint, p_now timestamptz,
    p_input_tokens integer, p_cached_input_tokens integer, p_cache_write_tokens integer,
    p_output_tokens integer, p_reasoning_tokens integer, p_estimated boolean,
    p_endpoint text, p_stream boolean, p_outcome text, p_started_at timestamptz,
    p_first_byte_ms integer, p_duration_ms integer, p_provider_cost bigint
) RETURNS billing_engine.hold_result LANGUAGE plpgsql AS $$
DECLARE
    h billing_hold;
    v_charged billing_hold;
BEGIN
    IF p_cost < 0 THEN
        RETURN billing_engine.hold_out('invalid_amount', NULL, NULL, NULL);
    END IF;
    SELECT * INTO h FROM billing_hold WHERE request_id = p_request_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN billing_engine.hold_out('not_found', NULL, NULL, NULL);
    END IF;
    -- settled_amount also marks a late zero-cost settle of an expired hold (no posting): a
    -- second settle of it is a replay, never a second charge.
    IF h.settled_amount IS NOT NULL THEN
        RETURN billing_engine.hold_out(
            CASE WHEN h.settled_amount = p_cost THEN 'replayed' ELSE 'conflict' END, NULL,
            h.settled_amount, h);
    ELSIF h.transaction_id IS NOT NULL THEN
        RETURN billing_engine.hold_out('already_posted', NULL,
            billing_engine.posting_charged(h.transaction_id, h.account_id), h);
    ELSIF h.state = 'released' THEN
        RETURN billing_engine.hold_out('already_released', h.state, 0, h);
    END IF;
    v_charged := billing_engine.hold_charge(h, p_cost, p_now, '', NULL);
    IF v_charged IS NULL THEN
        RETURN billing_engine.hold_out('already_posted', NULL,
            billing_engine.posting_charged(
                (SELECT t.id FROM billing_ledgertransaction AS t
                 WHERE t.idempotency_key = billing_engine.request_key(p_request_id)),
                h.account_id),
            h);
    END IF;
    PERFORM billing_engine.usage_record_write(v_charged, 'settled', p_cost, p_provider_cost,
        p_now,
        p_input_tokens, p_cached_input_tokens, p_cache_write_tokens, p_output_tokens,
        p_reasoning_tokens, p_estimated, p_endpoint, p_stream, p_outcome, p_started_at,
        p_first_byte_ms, p_duration_ms);
    RETURN billing_engine.hold_out('settled', NULL, p_cost, v_charged);
END;
$$;

-- Give a whole hold back (the upstream produced nothing): 'released', 'replayed',
-- 'already_resolved' (detail: its state) or 'not_found'.
CREATE FUNCTION billing_engine.hold_release(
    p_request_id text, p_now timestamptz,
    p_endpoint text, p_stream boolean, p_outcome text, p_started_at timestamptz,
    p_first_byte_ms integer, p_duration_ms integer
) RETURNS billing_engine.hold_result LANGUAGE plpgsql AS $$
DECLARE
    h billing_hold;
BEGIN
    SELECT * INTO h FROM billing_hold WHERE request_id = p_request_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN billing_engine.hold_out('not_found', NULL, NULL, NULL);
    ELSIF h.state = 'released' THEN
        RETURN billing_engine.hold_out('replayed', NULL, 0, h);
    ELSIF h.state <> 'active' THEN
        RETURN billing_engine.hold_out('already_resolved', h.state, NULL, h);
    END IF;
    UPDATE billing_hold SET state = 'released', resolved_at = p_now WHERE id = h.id
    RETURNING * INTO h;
    PERFORM billing_engine.usage_record_write(h, 'released', 0, 0, p_now, 0, 0, 0, 0, 0, false,
        p_endpoint, p_stream, p_outcome, p_started_at, p_first_byte_ms, p_duration_ms);
    UPDATE billing_account SET held = held - h.amount WHERE id = h.account_id;
    PERFORM billing_engine.budget_release(h, h.amount, 0, p_now);
    RETURN billing_engine.hold_out('released', NULL, 0, h);
END;
$$;

-- Finance charges a request's usage exactly as its settle would have: 'charged',
-- 'already_posted' (a late settle or a write-off got there first: nothing new is posted),
-- 'already_settled' (settled at zero cost: nothing to charge), 'already_released',
-- 'not_found' or 'invalid_amount'.
CREATE FUNCTION billing_engine.request_charge(
    p_request_id text, p_cost bigint, p_now timestamptz, p_memo text, p_posted_by bigint
) RETURNS billing_engine.hold_result LANGUAGE plpgsql AS $$
DECLARE
    h billing_hold;
    v_charged billing_hold;
    v_posted bigint;
BEGIN
    IF p_cost <= 0 THEN
        RETURN billing_engine.hold_out('invalid_amount', NULL, NULL, NULL);
    END IF;
    SELECT * INTO h FROM billing_hold WHERE request_id = p_request_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN billing_engine.hold_out('not_found', NULL, NULL, NULL);
    END IF;
    v_posted := COALESCE(h.transaction_id, (
        SELECT t.id FROM billing_ledgertransaction AS t
        WHERE t.idempotency_key = billing_engine.request_key(p_request_id)));
    IF v_posted IS NOT NULL THEN
        h.transaction_id := v_posted;
        RETURN billing_engine.hold_out('already_posted', NULL,
            billing_engine.posting_charged(v_posted, h.account_id), h);
    ELSIF h.state = 'settled' THEN
        RETURN billing_engine.hold_out('already_settled', h.state, 0, h);
    ELSIF h.state = 'released' THEN
        RETURN billing_engine.hold_out('already_released', h.state, 0, h);
    END IF;
    v_charged := billing_engine.hold_charge(h, p_cost, p_now, p_memo, p_posted_by);
    RETURN billing_engine.hold_out('charged', NULL, p_cost, v_charged);
END;
$$;

-- Finance writes a request's usage off: revenue is recognised and written off at once, so the
-- customer pays nothing and the loss shows on the write-offs account. An active hold is given
-- back whole. 'written_off', 'already_posted', 'already_settled' or 'invalid_amount'. A request
-- is charged or written off, never both: they share the request's key.
CREATE FUNCTION billing_engine.request_write_off(
    p_request_id text, p_amount bigint, p_now timestamptz, p_memo text, p_posted_by bigint
) RETURNS billing_engine.hold_result LANGUAGE plpgsql AS $$
DECLARE
    h billing_hold;
    v_found boolean;
    v_txn bigint;
    v_result billing_engine.hold_result;
BEGIN
    IF p_amount <= 0 THEN
        RETURN billing_engine.hold_out('invalid_amount', NULL, NULL, NULL);
    END IF;
    SELECT * INTO h FROM billing_hold WHERE request_id = p_request_id FOR UPDATE;
    v_found := FOUND;
    IF v_found AND h.transaction_id IS NOT NULL THEN
        RETURN billing_engine.hold_out('already_posted', NULL,
            billing_engine.posting_charged(h.transaction_id, h.account_id), h);
    ELSIF v_found AND h.state = 'settled' THEN
        RETURN billing_engine.hold_out('already_settled', h.state, h.settled_amount, h);
    END IF;
    v_txn := billing_engine.posting_write('write_off', billing_engine.request_key(p_request_id),
        ARRAY[-1, -3], ARRAY[p_amount, -p_amount], p_now, p_now, p_request_id, p_memo,
        p_posted_by, NULL, COALESCE(h.model_alias, ''), false, false, NULL, 0);
    IF v_txn IS NULL THEN
        RETURN billing_engine.hold_out('already_posted', NULL, NULL, h);
    END IF;
    IF NOT v_found THEN
        v_result := billing_engine.hold_out('written_off', NULL, 0, NULL);
        v_result.transaction_id := v_txn;
        RETURN v_result;
    END IF;
    IF h.state = 'active' THEN
        UPDATE billing_account SET held = held - h.amount WHERE id = h.account_id;
        PERFORM billing_engine.budget_release(h, h.amount, 0, p_now);
    END IF;
    UPDATE billing_hold
    SET state = CASE WHEN state = 'active' THEN 'released' ELSE state END,
        resolved_at = CASE WHEN state = 'active' THEN p_now ELSE resolved_at END,
        transaction_id = v_txn
    WHERE id = h.id
    RETURNING * INTO h;
    RETURN billing_engine.hold_out('written_off', NULL, 0, h);
END;
$$;

-- Record the usage a stream has relayed so far on its active hold (the gateway calls this every
-- few seconds and few hundred tokens): if the gateway dies before settling, the sweep charges it
-- when the hold expires. A hold no longer active is left alone (the settle got there first).
CREATE FUNCTION billing_engine.hold_checkpoint(
    p_request_id text, p_cost bigint, p_usage jsonb, p_now timestamptz
) RETURNS boolean LANGUAGE sql AS $$
    WITH marked AS (
        UPDATE billing_hold
        SET checkpoint_cost = p_cost, checkpoint_usage = p_usage, checkpoint_at = p_now
        WHERE request_id = p_request_id AND state = 'active'
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM marked)
$$;

-- Expire one batch of the holds due at p_now (never one before its time), starting after the
-- previous batch's (expires_at, id): the partial index still holds the entries of holds expired
-- moments ago (until vacuum), and rescanning them from the start every batch made the sweep
-- quadratic. Holds a settle is working on are skipped (SKIP LOCKED) and left to it. The
-- accounts are locked in id order, so concurrent sweeps cannot deadlock; SUM(bigint) is
-- numeric, so the subtraction stays exact. The update finds the batch by primary key (= ANY of
-- the locked ids): a join with the CTE let the planner hash the whole hold table every batch.
-- A hold with a checkpoint (its gateway died mid-stream) is then charged what it last
-- checkpointed, flagged late, with an estimated usage record: `charged` says so.
CREATE FUNCTION billing_engine.holds_expire_batch(
    p_now timestamptz, p_limit integer, p_after_at timestamptz, p_after_id bigint
) RETURNS TABLE (id bigint, request_id varchar, account_id bigint, api_key_id bigint,
                 model_alias varchar, amount bigint, expires_at timestamptz,
                 transaction_id bigint, charged bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_checkpointed bigint[];
    h billing_hold;
BEGIN
    WITH due AS (
        SELECT d.id FROM billing_hold AS d
        WHERE d.state = 'active' AND d.expires_at <= p_now
          AND (d.expires_at, d.id) > (p_after_at, p_after_id)
        ORDER BY d.expires_at, d.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), expired AS (
        UPDATE billing_hold AS e SET state = 'expired', resolved_at = p_now
        WHERE e.id = ANY(ARRAY(SELECT due.id FROM due))
        RETURNING e.id, e.account_id, e.api_key_id, e.amount, e.budgeted, e.checkpoint_cost
    ), per_account AS (
        SELECT x.account_id, SUM(x.amount) AS total FROM expired AS x GROUP BY x.account_id
    ), locked AS (
        SELECT a.id FROM billing_account AS a
        WHERE a.id IN (SELECT p.account_id FROM per_account AS p)
        ORDER BY a.id FOR UPDATE
    ), accounts AS (
        UPDATE billing_account AS a SET held = a.held - p.total
        FROM per_account AS p, locked AS l WHERE a.id = p.account_id AND l.id = a.id
        RETURNING a.id
    ), per_key AS (
        SELECT x.api_key_id, SUM(x.amount) AS total FROM expired AS x
        WHERE x.budgeted AND x.api_key_id IS NOT NULL GROUP BY x.api_key_id
    ), keys AS (
        -- Keys after accounts, the engine's lock order (a settle holds its account row while
        -- it updates its key): reading `accounts` here runs it to completion first. Left
        -- alone, PostgreSQL finishes unread data-modifying CTEs last-written first, so this
        -- update locked the key before the accounts and deadlocked with a concurrent settle.
        UPDATE billing_apikey AS k SET budget_held = k.budget_held - p.total
        FROM per_key AS p WHERE k.id = p.api_key_id AND (SELECT count(*) FROM accounts) >= 0
        RETURNING k.id
    )
    SELECT array_agg(x.id),
           array_agg(x.id) FILTER (WHERE x.checkpoint_cost > 0)
    INTO v_ids, v_checkpointed
    FROM expired AS x;

    FOR h IN SELECT * FROM billing_hold AS c WHERE c.id = ANY(v_checkpointed) ORDER BY c.id LOOP
        h := billing_engine.hold_charge(
            h, h.checkpoint_cost, p_now, 'charged from the last checkpoint', NULL);
        IF h IS NOT NULL THEN
            -- The checkpoint carries its provider cost (decimal USD) beside its usage.
            PERFORM billing_engine.usage_record_write(h, 'settled', h.settled_amount,
                round((h.checkpoint_usage->>'provider_cost')::numeric * 10000000000)::bigint,
                p_now,
                COALESCE((h.checkpoint_usage->>'input_tokens')::integer, 0),
                COALESCE((h.checkpoint_usage->>'cached_input_tokens')::integer, 0),
                COALESCE((h.checkpoint_usage->>'cache_write_tokens')::integer, 0),
                COALESCE((h.checkpoint_usage->>'output_tokens')::integer, 0),
                COALESCE((h.checkpoint_usage->>'reasoning_tokens')::integer, 0),
                true,
                COALESCE(h.checkpoint_usage->>'endpoint', ''),
                COALESCE((h.checkpoint_usage->>'stream')::boolean, true),
                'gateway_lost',
                COALESCE((h.checkpoint_usage->>'started_at')::timestamptz, h.created_at),
                NULL, NULL);
        END IF;
    END LOOP;

    RETURN QUERY
        SELECT r.id, r.request_id, r.account_id, r.api_key_id, r.model_alias, r.amount,
               r.expires_at, r.transaction_id,
               CASE WHEN r.id = ANY(v_checkpointed) THEN r.settled_amount END
        FROM billing_hold AS r WHERE r.id = ANY(v_ids);
END;
$$;

-- Roll every key whose budget period has ended into the current one: spent goes to zero, held
-- stays (holds placed in the old period are still open and count until they resolve; resetting
-- them is the leak that gave users false "budget exceeded" errors). Placing and settling roll a
-- key lazily too; this makes the figures right for idle keys. Returns how many rolled.
CREATE FUNCTION billing_engine.key_budgets_roll(p_now timestamptz) RETURNS integer
LANGUAGE sql AS $$
    WITH rolled AS (
        UPDATE billing_apikey AS k
        SET budget_spent = 0,
            budget_period_start = billing_engine.period_start(k.budget_period, p_now)
        WHERE k.budget_period <> ''
          AND (k.budget_period_start IS NULL
               OR k.budget_period_start < billing_engine.period_start(k.budget_period, p_now))
        RETURNING 1
    )
    SELECT count(*)::integer FROM rolled
$$;
