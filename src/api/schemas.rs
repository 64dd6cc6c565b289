//! OpenAPI schemas of the domain's value sets. `domain` stays free of the schema
//! framework: every [`StringEnum`] declares its values and docs once, and this module
//! turns them into `ToSchema` implementations, so a value added in `domain` reaches
//! the document with no second list to update.

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};

use crate::domain::image::ImageFormat;
use crate::domain::plan::{CloneMode, MergeAction};
use crate::domain::retention::{KeepReason, PruneReason};
use crate::domain::{
    Consistency, JobKind, JobStatus, Quiesce, ResourceStatus, RunStatus, RunTrigger, Scope,
    SnapshotConsistency, StringEnum, TargetOutcome, TargetType, TokenStatus, VmKind, VmState,
    VolumeStatus,
};

/// The schema of a string enum: its values, and its docs with each value's own.
fn string_enum_schema<T: StringEnum>() -> RefOr<Schema> {
    let mut description = unindent(T::DOC);
    for (value, doc) in T::ALL.iter().zip(T::VALUE_DOCS) {
        if !doc.trim().is_empty() {
            description.push_str(&format!("\n- `{}`: {}", value.as_str(), unindent(doc)));
        }
    }
    let mut schema = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(T::ALL.iter().map(|value| value.as_str())));
    if !description.is_empty() {
        schema = schema.description(Some(description));
    }
    RefOr::T(Schema::Object(schema.build()))
}

/// A doc comment's text: each `///` line keeps the space after the slashes.
fn unindent(doc: &str) -> String {
    doc.lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

macro_rules! string_enum_schemas {
    ($($name:ident),+ $(,)?) => {$(
        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                string_enum_schema::<$name>()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    )+};
}

string_enum_schemas!(
    VmState,
    VmKind,
    ResourceStatus,
    VolumeStatus,
    JobKind,
    JobStatus,
    TargetType,
    RunTrigger,
    RunStatus,
    TargetOutcome,
    ImageFormat,
    KeepReason,
    PruneReason,
    MergeAction,
    CloneMode,
    SnapshotConsistency,
    Consistency,
    Quiesce,
    Scope,
    TokenStatus,
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema lists exactly what serde writes, for a type declared either way.
    fn values_match_serde<T: StringEnum + serde::Serialize>() {
        for value in T::ALL {
            let json = serde_json::to_value(value).unwrap();
            assert_eq!(json, value.as_str(), "{}", std::any::type_name::<T>());
        }
        let RefOr::T(Schema::Object(object)) = string_enum_schema::<T>() else {
            panic!("not an object schema")
        };
        let listed: Vec<_> = object.enum_values.unwrap_or_default();
        assert_eq!(listed.len(), T::ALL.len());
    }

    #[test]
    fn every_value_set_is_listed_as_serde_writes_it() {
        values_match_serde::<VmState>();
        values_match_serde::<JobKind>();
        values_match_serde::<MergeAction>();
        values_match_serde::<KeepReason>();
        values_match_serde::<ImageFormat>();
        values_match_serde::<CloneMode>();
    }

    #[test]
    fn value_docs_reach_the_description() {
        let RefOr::T(Schema::Object(object)) = string_enum_schema::<MergeAction>() else {
            panic!("not an object schema")
        };
        let description = object.description.unwrap();
        assert!(description.starts_with("How one disk's layers are merged"));
        assert!(description.contains("- `stream`: The snapshot's clusters"));
    }
}
