//! Lists as the seeds page them: filters named in the query, then `sort_key` (`created_at`
//! unless given) and `sort_dir` (`desc` unless given), then `marker` (the id of the last item
//! of the previous page: the page starts after it), `offset`, and `limit` (1 to 1000, 1000
//! unless given). A client that pages with `marker` ends at the first empty page.

use std::collections::HashMap;

use blockrep_api::ApiError;
use serde_json::Value;

use crate::time::parse_client_time;

/// The most items a page holds, and what it holds unless told.
pub const MAX_LIMIT: usize = 1000;

const SORT_KEYS: [&str; 5] = ["created_at", "updated_at", "name", "id", "status"];

/// How a query parameter selects items.
#[derive(Clone, Copy, Debug)]
pub enum Filter {
    /// The item's field equals the value.
    Equals(&'static str),
    /// The item's field (a comma-separated list of ids) holds the value.
    Lists(&'static str),
    /// The item's `updated_at` (or `created_at`, never updated) is at or after the time.
    ChangedSince,
}

/// The items of one page: `query`'s filters (each a parameter name and how it selects),
/// order and paging applied to `items` (JSON objects with an `id`).
pub fn page(
    mut items: Vec<Value>,
    query: &HashMap<String, String>,
    filters: &[(&str, Filter)],
) -> Result<Vec<Value>, ApiError> {
    for (name, filter) in filters {
        let Some(wanted) = query.get(*name) else {
            continue;
        };
        let since = match filter {
            Filter::ChangedSince => Some(parse_client_time(wanted).ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "{name}: {wanted:?} is not a time such as 2017-09-28T05:08:32"
                ))
            })?),
            _ => None,
        };
        items.retain(|item| match filter {
            Filter::Equals(field) => text(item, field) == wanted.as_str(),
            Filter::Lists(field) => text(item, field)
                .split(',')
                .any(|id| id.trim() == wanted.as_str()),
            Filter::ChangedSince => {
                let changed = match text(item, "updated_at") {
                    "" => text(item, "created_at"),
                    t => t,
                };
                since.as_deref().is_some_and(|since| changed >= since)
            }
        });
    }
    let key = query.get("sort_key").map_or("created_at", String::as_str);
    if !SORT_KEYS.contains(&key) {
        return Err(ApiError::InvalidArgument(format!(
            "sort_key {key:?} is not one of: {}",
            SORT_KEYS.join(", ")
        )));
    }
    let descending = match query.get("sort_dir").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::InvalidArgument(format!(
                "sort_dir {other:?} is not asc or desc"
            )));
        }
    };
    items.sort_by(|a, b| {
        let order = text(a, key)
            .cmp(text(b, key))
            .then_with(|| text(a, "id").cmp(text(b, "id")));
        if descending { order.reverse() } else { order }
    });
    if let Some(marker) = query.get("marker") {
        let at = items
            .iter()
            .position(|item| text(item, "id") == marker.as_str())
            .ok_or_else(|| {
                ApiError::InvalidArgument(format!("marker {marker:?} is not an item of this list"))
            })?;
        items.drain(..=at);
    }
    let offset = number(query, "offset")?.unwrap_or(0);
    let limit = number(query, "limit")?.unwrap_or(MAX_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::InvalidArgument(format!(
            "limit {limit} is not between 1 and {MAX_LIMIT}"
        )));
    }
    Ok(items.into_iter().skip(offset).take(limit).collect())
}

fn number(query: &HashMap<String, String>, name: &str) -> Result<Option<usize>, ApiError> {
    query
        .get(name)
        .map(|v| {
            v.parse::<usize>().map_err(|_| {
                ApiError::InvalidArgument(format!("{name} {v:?} is not a whole number"))
            })
        })
        .transpose()
}

/// A field as text: a string's value, a number's digits, "" for null or absent.
fn text<'a>(item: &'a Value, field: &str) -> &'a str {
    match item.get(field) {
        Some(Value::String(s)) => s,
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn items() -> Vec<Value> {
        (1..=5)
            .map(|n| {
                json!({
                    "id": format!("id-{n}"),
                    "name": if n % 2 == 0 { "even" } else { "odd" },
                    "created_at": format!("2026-12-0{n}T00:00:00.000000"),
                    "updated_at": null,
                    "volume_ids": format!("v{n},w{n}"),
                })
            })
            .collect()
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ids(page: &[Value]) -> Vec<&str> {
        page.iter().map(|i| text(i, "id")).collect()
    }

    const FILTERS: [(&str, Filter); 3] = [
        ("name", Filter::Equals("name")),
        ("volume_id", Filter::Lists("volume_ids")),
        ("changes-since", Filter::ChangedSince),
    ];

    #[test]
    fn newest_first_unless_asked_and_filters_select() {
        let all = page(items(), &query(&[]), &FILTERS).unwrap();
        assert_eq!(ids(&all), ["id-5", "id-4", "id-3", "id-2", "id-1"]);
        let asc = page(items(), &query(&[("sort_dir", "asc")]), &FILTERS).unwrap();
        assert_eq!(ids(&asc), ["id-1", "id-2", "id-3", "id-4", "id-5"]);
        let even = page(items(), &query(&[("name", "even")]), &FILTERS).unwrap();
        assert_eq!(ids(&even), ["id-4", "id-2"]);
        let holding = page(items(), &query(&[("volume_id", "w3")]), &FILTERS).unwrap();
        assert_eq!(ids(&holding), ["id-3"]);
        let since = page(
            items(),
            &query(&[("changes-since", "2026-12-04T00:00:00")]),
            &FILTERS,
        )
        .unwrap();
        assert_eq!(ids(&since), ["id-5", "id-4"]);
    }

    /// A client paging with the marker sees every item once and ends at an empty page.
    #[test]
    fn a_marker_walk_visits_every_item_once_then_an_empty_page() {
        let mut seen = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut q = vec![("limit", "2")];
            if let Some(m) = &marker {
                q.push(("marker", m));
            }
            let page = page(items(), &query(&q), &FILTERS).unwrap();
            if page.is_empty() {
                break;
            }
            marker = Some(text(page.last().unwrap(), "id").to_owned());
            seen.extend(ids(&page).into_iter().map(str::to_owned));
        }
        assert_eq!(seen, ["id-5", "id-4", "id-3", "id-2", "id-1"]);
        let offset = page(items(), &query(&[("offset", "3")]), &FILTERS).unwrap();
        assert_eq!(ids(&offset), ["id-2", "id-1"]);
    }

    #[test]
    fn bad_paging_is_refused() {
        for q in [
            vec![("limit", "0")],
            vec![("limit", "1001")],
            vec![("limit", "x")],
            vec![("offset", "-1")],
            vec![("marker", "nope")],
            vec![("sort_key", "size")],
            vec![("sort_dir", "up")],
            vec![("changes-since", "soon")],
        ] {
            let refused = page(items(), &query(&q), &FILTERS).unwrap_err();
            assert_eq!(refused.code(), 400, "{q:?}: {refused}");
        }
    }
}
