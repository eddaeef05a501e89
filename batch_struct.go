package pgetl

import (
	"context"
	"fmt"
	"reflect"
	"strings"
)

// StructAdder adds rows of struct type T to a [BatchSession], one field per column:
// a field tagged `db:"column"` (pgx's convention, as for pgx.RowToStructByName) goes
// to that column, an untagged exported field to the column of its name (compared
// case-insensitively), a field tagged `db:"-"` nowhere; fields of embedded structs
// count as the outer struct's. Every column of BatchConfig.Columns must have a field.
//
// The mapping is made and type-checked once, by NewStructAdder; adding a row then
// costs reading its fields, as a caller building the []any of Add would.
type StructAdder[T any] struct {
	b      *BatchSession
	fields [][]int // per column: the field's index path in T
	vals   []any   // reused for each row: Add does not keep it
}

// NewStructAdder maps T's fields to b's columns and checks their types: a field whose
// Go type the column's type cannot take is an error now, not at the first row. A
// string field fits any column (its text is parsed, as Add does).
func NewStructAdder[T any](b *BatchSession) (*StructAdder[T], error) {
	t := reflect.TypeFor[T]()
	if t.Kind() != reflect.Struct {
		return nil, fmt.Errorf("pgetl: NewStructAdder: %s is not a struct", t)
	}
	if b.cfg.SQL != "" && len(b.cfg.Columns) == 0 {
		return nil, fmt.Errorf("pgetl: NewStructAdder: the statement path needs BatchConfig.Columns to name its arguments")
	}
	byName := map[string][]int{}
	structFields(t, nil, byName)
	a := &StructAdder[T]{b: b, vals: make([]any, len(b.cfg.Columns))}
	for i, col := range b.cfg.Columns {
		idx, ok := byName[strings.ToLower(col)]
		if !ok {
			return nil, fmt.Errorf("pgetl: NewStructAdder: %s has no field for column %q (tag one `db:%q`)", t, col, col)
		}
		ft := t.FieldByIndex(idx).Type
		if err := b.checkGoType(i, ft); err != nil {
			return nil, fmt.Errorf("pgetl: NewStructAdder: %s.%s for column %q: %w", t, t.FieldByIndex(idx).Name, col, err)
		}
		a.fields = append(a.fields, idx)
	}
	return a, nil
}

// structFields collects the columns of t's fields (with pgx's rules) into byName.
func structFields(t reflect.Type, prefix []int, byName map[string][]int) {
	for i := range t.NumField() {
		f := t.Field(i)
		idx := append(append([]int(nil), prefix...), i)
		tag, tagged := f.Tag.Lookup("db")
		if tag == "-" {
			continue
		}
		if f.Anonymous && !tagged && f.Type.Kind() == reflect.Struct {
			structFields(f.Type, idx, byName)
			continue
		}
		if !f.IsExported() {
			continue
		}
		name := f.Name
		if tagged {
			name, _, _ = strings.Cut(tag, ",")
		}
		if _, dup := byName[strings.ToLower(name)]; !dup {
			byName[strings.ToLower(name)] = idx
		}
	}
}

// checkGoType checks that values of Go type t can be encoded for column i.
func (b *BatchSession) checkGoType(i int, t reflect.Type) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem() // nil is NULL; the pointee must fit
	}
	if t.Kind() == reflect.String {
		return nil
	}
	v := reflect.Zero(t)
	switch t.Kind() { // a nil slice or map would encode as NULL whatever the column
	case reflect.Slice:
		v = reflect.MakeSlice(t, 0, 0)
	case reflect.Map:
		v = reflect.MakeMap(t)
	}
	if _, err := b.encodeValue(b.oids[i], v.Interface(), nil); err != nil {
		return err
	}
	return nil
}

// Add adds row, as BatchSession.Add adds its values.
func (a *StructAdder[T]) Add(ctx context.Context, cursor string, row *T) error {
	v := reflect.ValueOf(row).Elem()
	for i, idx := range a.fields {
		f := v.Field(idx[0])
		for _, j := range idx[1:] {
			f = f.Field(j)
		}
		a.vals[i] = f.Interface()
	}
	err := a.b.Add(ctx, cursor, a.vals...)
	clear(a.vals)
	return err
}
