"""A ledger transaction without legs is refused at commit, like an unbalanced one: the legs'
trigger (0002) never fires for a transaction that has none."""

from django.db import migrations

FORWARD = r"""
CREATE FUNCTION billing_check_transaction_has_legs() RETURNS trigger AS $$
BEGIN
    IF (SELECT count(*) FROM billing_ledgerleg WHERE transaction_id = NEW.id) < 2 THEN
        RAISE EXCEPTION 'ledger transaction % has fewer than two legs', NEW.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER billing_ledgertransaction_has_legs
    AFTER INSERT ON billing_ledgertransaction
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION billing_check_transaction_has_legs();
"""

REVERSE = r"""
DROP TRIGGER IF EXISTS billing_ledgertransaction_has_legs ON billing_ledgertransaction;
DROP FUNCTION IF EXISTS billing_check_transaction_has_legs();
"""


class Migration(migrations.Migration):
    dependencies = [("billing", "0006_money_engine")]

    operations = [migrations.RunSQL(FORWARD, REVERSE)]
