//! A graph under construction (nodes and float initializers, every name unique) and the model
//! file around it: one float NCHW input, one logits output, opset and metadata.

use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType,
    tensor_proto::DataType,
    tensor_shape_proto::{Dimension, dimension},
    type_proto,
};
use prost::Message;
use std::collections::HashSet;
use std::ops::RangeInclusive;

/// The opsets the graphs are written for: every operator used (Conv, BatchNormalization, Relu,
/// MaxPool, Add, GlobalAveragePool, Flatten, Gemm) means the same, with the same attributes,
/// from opset 9 (BatchNormalization's last change of inputs) to 23 (what onnxruntime 1.20 and
/// later run).
pub const OPSETS: RangeInclusive<i64> = 9..=23;

/// The oldest IR version that carries `opset` (ONNX's version table), so that older runtimes
/// read the file.
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=9 => 4,
        10 => 5,
        11 => 6,
        12..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        21..=22 => 10,
        _ => 11,
    }
}

/// Nodes and weights in the order they were added (a topological order: a node only reads
/// names added before it).
#[derive(Default)]
pub struct Graph {
    /// The model's one input.
    input: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: HashSet<String>,
}

impl Graph {
    pub fn new(input: &str) -> Self {
        let mut g = Self {
            input: input.to_string(),
            ..Self::default()
        };
        g.names.insert(input.to_string());
        g
    }

    /// `hint`, or `hint_2`, `hint_3`, ... when taken.
    fn unique(&mut self, hint: &str) -> String {
        let mut name = hint.to_string();
        let mut n = 1;
        while self.names.contains(&name) {
            n += 1;
            name = format!("{hint}_{n}");
        }
        self.names.insert(name.clone());
        name
    }

    /// A float32 constant (a weight) of shape `dims`; returns its name.
    pub fn weight(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        assert_eq!(
            dims.iter().product::<usize>(),
            values.len(),
            "{name}: shape and values disagree"
        );
        let name = self.unique(name);
        self.initializers.push(TensorProto {
            name: Some(name.clone()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(DataType::Float as i32),
            raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
        name
    }

    /// A node of operator `op` reading `inputs`; its one output (and the node) is named after
    /// `hint`, which it returns.
    pub fn node(&mut self, op: &str, hint: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        for i in inputs {
            assert!(
                self.names.contains(*i),
                "{op} node {hint} reads {i}, which nothing wrote"
            );
        }
        let name = self.unique(hint);
        self.nodes.push(NodeProto {
            name: Some(name.clone()),
            op_type: Some(op.to_string()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.clone()],
            attribute: attributes,
            ..Default::default()
        });
        name
    }

    /// Renames the output of the node that wrote `from` (the last name a graph computes
    /// becomes the model's output name).
    fn rename_output(&mut self, from: &str, to: &str) {
        assert!(!self.names.contains(to), "{to} is taken");
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.output.iter().any(|o| o == from))
            .unwrap_or_else(|| panic!("no node writes {from}"));
        for o in &mut node.output {
            if o == from {
                *o = to.to_string();
            }
        }
    }

    pub fn ints(name: &str, values: &[usize]) -> AttributeProto {
        AttributeProto {
            name: Some(name.to_string()),
            r#type: Some(AttributeType::Ints as i32),
            ints: values.iter().map(|&v| v as i64).collect(),
            ..Default::default()
        }
    }

    pub fn int(name: &str, value: i64) -> AttributeProto {
        AttributeProto {
            name: Some(name.to_string()),
            r#type: Some(AttributeType::Int as i32),
            i: Some(value),
            ..Default::default()
        }
    }

    pub fn float(name: &str, value: f32) -> AttributeProto {
        AttributeProto {
            name: Some(name.to_string()),
            r#type: Some(AttributeType::Float as i32),
            f: Some(value),
            ..Default::default()
        }
    }
}

/// What the model file says around the graph.
pub struct ModelInfo {
    pub opset: i64,
    /// The input's dimensions after the batch: `[3, H, W]` (its name is the graph's).
    pub input: [usize; 3],
    /// The output's name and its class count.
    pub output: (String, usize),
    /// A fixed batch size, or `None` for a dynamic batch dimension named `batch`.
    pub batch: Option<usize>,
    pub graph_name: String,
    /// `metadata_props`: key, value.
    pub metadata: Vec<(String, String)>,
}

fn float_value(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(n) => dimension::Value::DimValue(*n as i64),
                None => dimension::Value::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The model file's bytes: `graph`, whose last computed name is `last`, with the input and
/// output `info` names. Panics on an opset outside [`OPSETS`] (callers refuse those first).
pub fn encode(mut graph: Graph, last: &str, info: ModelInfo) -> Vec<u8> {
    assert!(OPSETS.contains(&info.opset), "opset {} is not written", info.opset);
    let [c, h, w] = info.input;
    let (output, classes) = &info.output;
    graph.rename_output(last, output);
    let model = ModelProto {
        ir_version: Some(ir_version(info.opset)),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(info.opset),
        }],
        producer_name: Some("resnet-cifar".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(GraphProto {
            name: Some(info.graph_name),
            node: graph.nodes,
            initializer: graph.initializers,
            input: vec![float_value(&graph.input, &[info.batch, Some(c), Some(h), Some(w)])],
            output: vec![float_value(output, &[info.batch, Some(*classes)])],
            ..Default::default()
        }),
        metadata_props: info
            .metadata
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: Some(k),
                value: Some(v),
            })
            .collect(),
        ..Default::default()
    };
    model.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(opset: i64) -> ModelInfo {
        ModelInfo {
            opset,
            input: [1, 2, 2],
            output: ("logits".into(), 4),
            batch: None,
            graph_name: "g".into(),
            metadata: vec![("k".into(), "v".into())],
        }
    }

    #[test]
    fn taken_names_get_a_suffix_and_the_last_output_is_renamed() {
        let mut g = Graph::new("input");
        let w = g.weight("w", &[4, 4], &[0.5; 16]);
        let a = g.node("Flatten", "flat", &["input"], vec![Graph::int("axis", 1)]);
        let b = g.node("Relu", "flat", &[&a], vec![]);
        assert_eq!(b, "flat_2");
        let last = g.node("Gemm", "fc", &[&b, &w], vec![Graph::int("transB", 1)]);
        let bytes = encode(g, &last, info(17));
        let model = ModelProto::decode(bytes.as_slice()).unwrap();
        assert_eq!(model.ir_version, Some(8));
        let graph = model.graph.unwrap();
        assert_eq!(graph.node[2].output, vec!["logits".to_string()]);
        assert_eq!(graph.node[2].input, vec!["flat_2".to_string(), "w".to_string()]);
        assert_eq!(graph.initializer[0].raw_data.as_ref().unwrap().len(), 64);
        let dims = |v: &ValueInfoProto| match &v.r#type.as_ref().unwrap().value {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref().unwrap().dim.clone(),
            _ => panic!("not a tensor"),
        };
        let input = dims(&graph.input[0]);
        assert_eq!(input.len(), 4);
        assert_eq!(input[0].value, Some(dimension::Value::DimParam("batch".into())));
        assert_eq!(input[3].value, Some(dimension::Value::DimValue(2)));
        assert_eq!(model.metadata_props[0].value.as_deref(), Some("v"));
    }

    #[test]
    #[should_panic(expected = "which nothing wrote")]
    fn a_node_reading_an_unknown_name_is_a_bug() {
        Graph::new("input").node("Relu", "r", &["nothing"], vec![]);
    }

    #[test]
    fn ir_versions_follow_onnx_version_table() {
        // onnx.helper.VERSION_TABLE: (release, IR, opset): 1.4.1 (4, 9), 1.6 (6, 11),
        // 1.12 (8, 17), 1.16 (10, 21), 1.18 (11, 23).
        for (opset, ir) in [(9, 4), (11, 6), (17, 8), (21, 10), (23, 11)] {
            assert_eq!(ir_version(opset), ir, "opset {opset}");
        }
    }
}
