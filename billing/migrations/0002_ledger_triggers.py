"""Ledger invariants enforced by the database itself, not only by Python.

A deferred constraint trigger rejects, at commit, any transaction whose legs do not sum to
zero; legs and transactions refuse UPDATE and DELETE.
"""

from django.db import migrations

PG_FORWARD = r"""
CREATE OR REPLACE FUNCTION billing_check_transaction_balanced() RETURNS trigger AS $$
DECLARE
    leg_total bigint;
BEGIN
    SELECT COALESCE(SUM(amount), 0) INTO leg_total
      FROM billing_ledgerleg WHERE transaction_id = NEW.transaction_id;
    IF leg_total <> 0 THEN
        RAISE EXCEPTION 'ledger transaction % is unbalanced: legs sum to % units',
            NEW.transaction_id, leg_total
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER billing_ledgerleg_balanced
    AFTER INSERT ON billing_ledgerleg
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION billing_check_transaction_balanced();

CREATE OR REPLACE FUNCTION billing_refuse_ledger_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused (post a reversal instead)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_ledgerleg_immutable
    BEFORE UPDATE OR DELETE ON billing_ledgerleg
    FOR EACH ROW EXECUTE FUNCTION billing_refuse_ledger_change();

CREATE TRIGGER billing_ledgertransaction_immutable
    BEFORE UPDATE OR DELETE ON billing_ledgertransaction
    FOR EACH ROW EXECUTE FUNCTION billing_refuse_ledger_change();
"""

PG_REVERSE = r"""
DROP TRIGGER IF EXISTS billing_ledgertransaction_immutable ON billing_ledgertransaction;
DROP TRIGGER IF EXISTS billing_ledgerleg_immutable ON billing_ledgerleg;
DROP FUNCTION IF EXISTS billing_refuse_ledger_change();
DROP TRIGGER IF EXISTS billing_ledgerleg_balanced ON billing_ledgerleg;
DROP FUNCTION IF EXISTS billing_check_transaction_balanced();
"""

def forward(apps, schema_editor):
    schema_editor.execute(PG_FORWARD, params=None)


def reverse(apps, schema_editor):
    schema_editor.execute(PG_REVERSE, params=None)


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [migrations.RunPython(forward, reverse)]
