package pgetl

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// TestGuardsInEveryTransaction reads the guards inside the transactions pgetl runs: a
// Tx, a COPY batch (through a trigger) and a statement batch. On PostgreSQL 14 and
// later client_connection_check_interval is among them (a backend of a dead client
// waiting at the fence notices it), older servers are left without it.
func TestGuardsInEveryTransaction(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	db.Exec(t, `CREATE TABLE seen (via text, lock_timeout text, statement_timeout text, idle text, check_interval text);
		CREATE TABLE t (id int);
		CREATE FUNCTION record() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN
			INSERT INTO seen SELECT TG_ARGV[0], current_setting('lock_timeout'), current_setting('statement_timeout'),
				current_setting('idle_in_transaction_session_timeout'), current_setting('client_connection_check_interval', true);
			RETURN NEW; END$$;
		CREATE TRIGGER record BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION record('copy')`)
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "guards", CheckpointSchema: db.Schema,
		Guards: Guards{LockTimeout: 7 * time.Second, ClientCheckInterval: 2 * time.Second}})
	require.NoError(t, err)
	defer s.Close(ctx)
	require.NoError(t, s.Tx(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `INSERT INTO seen SELECT 'tx', current_setting('lock_timeout'), current_setting('statement_timeout'),
			current_setting('idle_in_transaction_session_timeout'), current_setting('client_connection_check_interval', true)`)
		return err
	}))
	bs, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".t", Columns: []string{"id"}})
	require.NoError(t, err)
	require.NoError(t, bs.Add(ctx, "1", int32(1)))
	require.NoError(t, bs.Close(ctx))
	st, err := s.Batch(ctx, BatchConfig{SQL: `INSERT INTO ` + db.Schema + `.seen SELECT 'statement', current_setting('lock_timeout'),
		current_setting('statement_timeout'), current_setting('idle_in_transaction_session_timeout'),
		current_setting('client_connection_check_interval', true) WHERE $1::int = 1`})
	require.NoError(t, err)
	require.NoError(t, st.Add(ctx, "2", int32(1)))
	require.NoError(t, st.Close(ctx))

	version := db.Int(t, "SELECT current_setting('server_version_num')::bigint")
	wantCheck := "2s"
	if version < 140000 {
		wantCheck = ""
	}
	rows, err := db.Pool.Query(ctx, "SELECT ARRAY[via, lock_timeout, statement_timeout, idle, coalesce(check_interval, '')] FROM seen ORDER BY via")
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, pgx.RowTo[[]string])
	require.NoError(t, err)
	require.Equal(t, [][]string{
		{"copy", "7s", "5min", "1min", wantCheck},
		{"statement", "7s", "5min", "1min", wantCheck},
		{"tx", "7s", "5min", "1min", wantCheck},
	}, got)
}
