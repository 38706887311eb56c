//! Unit tests of the parent module.

use std::time::UNIX_EPOCH;

use super::*;

#[test]
fn daily_runs_follow_the_utc_clock() {
    let day = 86_400;
    let at = Schedule::DailyAt(Duration::from_secs(1800));
    let before = UNIX_EPOCH + Duration::from_secs(20_000 * day + 600);
    let after = UNIX_EPOCH + Duration::from_secs(20_000 * day + 3600);
    assert_eq!(
        at.next_after(before),
        UNIX_EPOCH + Duration::from_secs(20_000 * day + 1800)
    );
    assert_eq!(
        at.next_after(after),
        UNIX_EPOCH + Duration::from_secs(20_001 * day + 1800)
    );
    assert_eq!(at.fresh_for(after), Duration::from_secs(day - 1800));
    assert_eq!(parse_hh_mm("00:30"), Some(Duration::from_secs(1800)));
    assert_eq!(parse_hh_mm("24:00"), None);
    assert_eq!(parse_hh_mm("7:30"), None);
}

#[test]
fn a_misspelt_parameter_refuses_the_warm_up() {
    let table = RouteTable::from_config(&Config::defaults().unwrap()).unwrap();
    let mut question = BTreeMap::new();
    question.insert("hashtag".to_owned(), QuestionValue::Text("nba".into()));
    let config = WarmupConfig {
        name: None,
        route: crate::route::HASHTAG_DETAIL_PATH.into(),
        every: Some(Duration::from_secs(3600)),
        at: None,
        max_credits_per_day: 10,
        start_delay: None,
        pace: None,
        questions: vec![question],
        questions_file: None,
    };
    let error = WarmupPlan::compile(&[config], &table).unwrap_err();
    assert!(
        error.to_string().ends_with(
            "questions[0]: \"hashtag\" is not a parameter of this route \
             (it has period, region, hashtag_name)"
        ),
        "{error}"
    );
}

#[test]
fn lists_expand_to_every_combination() {
    let mut question = BTreeMap::new();
    question.insert("hashtag_name".to_owned(), QuestionValue::Text("a".into()));
    question.insert(
        "period".to_owned(),
        QuestionValue::List(vec![QuestionValue::Number(7), QuestionValue::Number(30)]),
    );
    question.insert(
        "region".to_owned(),
        QuestionValue::List(vec![
            QuestionValue::Text("US".into()),
            QuestionValue::Text("GB".into()),
        ]),
    );
    assert_eq!(expand(&question).unwrap().len(), 4);
}
