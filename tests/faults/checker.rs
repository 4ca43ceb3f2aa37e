//! The shared checker's own rules, on hand-made inputs: each can fail.

use commerce_events::faults::{Checker, Ledger};

fn history(request: &str) -> (u64, u64, String) {
    (1, 7, request.to_string())
}

#[test]
fn a_user_whose_coupons_were_issued_in_another_order_is_counted_once() {
    let mut ledger = Ledger::default();
    ledger
        .in_order
        .insert(7, vec!["a".into(), "b".into(), "c".into()]);
    ledger.in_order.insert(8, vec!["d".into(), "e".into()]);
    let in_order = [history("a"), history("b"), history("d"), history("c")];
    assert_eq!(Checker::users_out_of_order(&ledger, &in_order), 0);
    // A request not issued (refused) says nothing about the order of the others.
    let refused_between = [history("a"), history("c")];
    assert_eq!(Checker::users_out_of_order(&ledger, &refused_between), 0);
    let swapped = [history("b"), history("a"), history("e"), history("d")];
    assert_eq!(Checker::users_out_of_order(&ledger, &swapped), 2);
    let last_first = [history("c"), history("a"), history("b"), history("d")];
    assert_eq!(Checker::users_out_of_order(&ledger, &last_first), 1);
}
