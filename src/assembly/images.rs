//! Row images: the tuples of one row message move into the changes routed from it.
//!
//! Invariants:
//! - Routing borrows the message; a change is planned by naming the image it uses, then
//!   the images move out of the message once every change is planned. An image is copied
//!   only while a further change still wants it, so the usual one-change message copies
//!   nothing.
//! - A change naming an image the message does not have gets none (never an empty row).

use crate::apply::writer::OwnedRowOp;
use crate::decode::{Message, OldTuple, Tuple};
use crate::route::RowOp;

/// Which row image of a row message a change uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    New,
    Old,
}

/// A change to apply, naming row images instead of borrowing them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planned {
    Upsert { new: Image, update: bool },
    Delete { old: Image },
    Rekey { old: Image, new: Image },
    Truncate,
}

/// The row images of one row message, moved into the changes routed from it: a row image
/// is copied only when a second change wants it (routing never does that today; a row
/// moving between tenants uses its old image for one and its new image for the other).
#[derive(Default)]
pub struct Images {
    new: Option<Tuple>,
    old: Option<Tuple>,
    /// Changes still to take each image: [new, old].
    wanted: [u32; 2],
}

impl Images {
    /// Notes that a change uses the images `op` borrows from `message`.
    pub fn plan(&mut self, message: &Message, op: &RowOp<'_>) -> Planned {
        let (new, old) = match message {
            Message::Insert(i) => (Some(&i.new), None),
            Message::Update(u) => (Some(&u.new), u.old.as_ref().map(|o| o.tuple())),
            Message::Delete(d) => (None, Some(d.old.tuple())),
            _ => (None, None),
        };
        let mut image = |t: &Tuple| {
            let which = if new.is_some_and(|n| std::ptr::eq(n, t)) {
                Image::New
            } else {
                debug_assert!(
                    old.is_some_and(|o| std::ptr::eq(o, t)),
                    "routed ops borrow the message"
                );
                Image::Old
            };
            self.wanted[which as usize] += 1;
            which
        };
        match op {
            RowOp::Upsert { new, update } => Planned::Upsert {
                new: image(new),
                update: *update,
            },
            RowOp::Delete { old } => Planned::Delete { old: image(old) },
            RowOp::Rekey { old, new } => Planned::Rekey {
                old: image(old),
                new: image(new),
            },
            RowOp::Truncate => Planned::Truncate,
        }
    }

    /// Takes the message's row images once every change is planned.
    pub fn fill(&mut self, message: Message) {
        let (new, old) = match message {
            Message::Insert(i) => (Some(i.new), None),
            Message::Update(u) => (Some(u.new), u.old.map(OldTuple::into_tuple)),
            Message::Delete(d) => (None, Some(d.old.into_tuple())),
            _ => (None, None),
        };
        self.new = new;
        self.old = old;
    }

    fn image(&mut self, which: Image) -> Option<Tuple> {
        let slot = match which {
            Image::New => &mut self.new,
            Image::Old => &mut self.old,
        };
        let wanted = &mut self.wanted[which as usize];
        *wanted = wanted.saturating_sub(1);
        match slot {
            Some(t) if *wanted > 0 => Some(t.clone()),
            _ => slot.take(),
        }
    }

    /// The change `plan` describes; `None` if the message had no such image (a bug, not
    /// input: the caller fails the tenant rather than apply a made-up row).
    pub fn take(&mut self, plan: Planned) -> Option<OwnedRowOp> {
        Some(match plan {
            Planned::Upsert { new, update } => OwnedRowOp::Upsert {
                new: self.image(new)?,
                update,
            },
            Planned::Delete { old } => OwnedRowOp::Delete {
                old: self.image(old)?,
            },
            Planned::Rekey { old, new } => OwnedRowOp::Rekey {
                old: self.image(old)?,
                new: self.image(new)?,
            },
            Planned::Truncate => OwnedRowOp::Truncate,
        })
    }

    /// Drops a planned change that will not be taken (its tenant failed meanwhile), so the
    /// last change that does take an image moves it instead of copying it.
    pub fn forgo(&mut self, plan: Planned) {
        let images = match plan {
            Planned::Upsert { new, .. } => [Some(new), None],
            Planned::Delete { old } => [Some(old), None],
            Planned::Rekey { old, new } => [Some(old), Some(new)],
            Planned::Truncate => [None, None],
        };
        for which in images.into_iter().flatten() {
            let wanted = &mut self.wanted[which as usize];
            *wanted = wanted.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Datum, RelationId};
    use bytes::Bytes;

    fn row(id: i64, note: Datum) -> Tuple {
        Tuple(vec![
            Datum::Text(Bytes::from_static(b"7")),
            Datum::Text(Bytes::from(id.to_string())),
            note,
        ])
    }

    #[test]
    fn row_images_move_into_the_changes_and_are_copied_only_when_wanted_twice() {
        use crate::decode::{OldTuple, Update};
        let note = || Datum::Text(Bytes::from_static(b"n"));
        let (old, new) = (row(1, note()), row(2, note()));
        let message = Message::Update(Update {
            xid: None,
            relation: RelationId(1),
            old: Some(OldTuple::Key(old.clone())),
            new: new.clone(),
        });
        // A row moving between tenants: its old image leaves one, its new image arrives
        // at the other.
        let (Message::Update(u), mut images) = (&message, Images::default()) else {
            unreachable!()
        };
        let leave = images.plan(
            &message,
            &RowOp::Delete {
                old: u.old.as_ref().unwrap().tuple(),
            },
        );
        let arrive = images.plan(
            &message,
            &RowOp::Upsert {
                new: &u.new,
                update: false,
            },
        );
        // The same new image wanted a second time (a copy).
        let again = images.plan(
            &message,
            &RowOp::Upsert {
                new: &u.new,
                update: true,
            },
        );
        assert_eq!(leave, Planned::Delete { old: Image::Old });
        assert_eq!(
            arrive,
            Planned::Upsert {
                new: Image::New,
                update: false
            }
        );
        images.fill(message);
        assert_eq!(
            images.take(leave),
            Some(OwnedRowOp::Delete { old: old.clone() })
        );
        assert_eq!(
            images.take(arrive),
            Some(OwnedRowOp::Upsert {
                new: new.clone(),
                update: false
            })
        );
        assert_eq!(
            images.take(again),
            Some(OwnedRowOp::Upsert {
                new: new.clone(),
                update: true
            })
        );
        // Every image is spent: a further change naming one gets none, not an empty row.
        assert_eq!(images.take(leave), None);

        // A planned change that is dropped (its tenant failed) wants nothing any more: the
        // other change then moves the image instead of copying it.
        let message = Message::Update(Update {
            xid: None,
            relation: RelationId(1),
            old: None,
            new: new.clone(),
        });
        let (Message::Update(u), mut images) = (&message, Images::default()) else {
            unreachable!()
        };
        let upsert = RowOp::Upsert {
            new: &u.new,
            update: true,
        };
        let (kept, dropped) = (
            images.plan(&message, &upsert),
            images.plan(&message, &upsert),
        );
        images.fill(message);
        images.forgo(dropped);
        assert_eq!(
            images.take(kept),
            Some(OwnedRowOp::Upsert {
                new: new.clone(),
                update: true
            })
        );
        assert!(images.new.is_none(), "moved, not copied");
    }
}
