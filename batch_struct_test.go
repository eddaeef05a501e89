package pgetl

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
)

type itemBase struct {
	ID int64 `db:"id"`
}

type itemStruct struct {
	itemBase
	Name   string
	Price  string `db:"price"`
	Qty    int32  `db:"qty"`
	At     time.Time
	Ignore chan int `db:"-"`
}

func TestStructAdder(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "struct")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 300, CommitInterval: -1})
	require.NoError(t, err)
	add, err := NewStructAdder[itemStruct](b)
	require.NoError(t, err)
	for i := int64(1); i <= 1000; i++ {
		r := itemRow(i)
		row := itemStruct{itemBase: itemBase{ID: i}, Name: r[1].(string), Price: r[2].(string), Qty: r[3].(int32), At: r[4].(time.Time)}
		require.NoError(t, add.Add(ctx, strconv.FormatInt(i, 10), &row))
	}
	require.NoError(t, b.Close(ctx))
	bd.requireExactly(t, 1000)

	b, err = s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.NoError(t, err)
	defer b.Close(ctx)
	type noQty struct {
		ID    int64
		Name  string
		Price string
		At    time.Time
	}
	_, err = NewStructAdder[noQty](b)
	require.ErrorContains(t, err, `has no field for column "qty"`)
	type badAt struct {
		ID    int64
		Name  string
		Price string
		Qty   int32
		At    []int
	}
	_, err = NewStructAdder[badAt](b)
	require.ErrorContains(t, err, `badAt.At for column "at"`)
}

type productStruct struct {
	SKU       string         `db:"sku"`
	Name      string         `db:"name"`
	Price     pgtype.Numeric `db:"price"`
	Inventory int32          `db:"inventory"`
	UpdatedAt time.Time      `db:"updated_at"`
}

// BenchmarkStructRows: the products workload added from structs (StructAdder) beside
// the same rows added positionally, in the same run; goal: ≤ 10 % slower.
func BenchmarkStructRows(b *testing.B) {
	db := pgtest.New(b)
	ctx := context.Background()
	n := benchN()
	rows := benchRows(n, 1)
	structs := make([]productStruct, len(rows))
	for i, r := range rows {
		structs[i] = productStruct{SKU: r[0].(string), Name: r[1].(string), Price: r[2].(pgtype.Numeric), Inventory: r[3].(int32), UpdatedAt: r[4].(time.Time)}
	}
	b.Run("positional", func(b *testing.B) {
		measure(b, db, n, nil, func(tbl string) error {
			return loadBatch(ctx, benchSession(b, db), BatchConfig{Table: tbl, Columns: workload.Columns}, rows, nil)
		})
	})
	b.Run("struct", func(b *testing.B) {
		measure(b, db, n, nil, func(tbl string) error {
			bs, err := benchSession(b, db).Batch(ctx, BatchConfig{Table: tbl, Columns: workload.Columns})
			if err != nil {
				return err
			}
			add, err := NewStructAdder[productStruct](bs)
			if err != nil {
				return err
			}
			for i := range structs {
				if err := add.Add(ctx, strconv.Itoa(i+1), &structs[i]); err != nil {
					return err
				}
			}
			return bs.Close(ctx)
		})
	})
}
