// The libtorch integration: views share the tensors' memory (data pointers, strides, storage
// offsets), gradients are reachable, and every tensor adalora cannot view is refused with a
// message that names the function, the argument, what was expected and what was given.

#include <catch2/catch.hpp>

#include <torch/torch.h>

#include <vector>

#include "adalora/adapter_set.hpp"
#include "adalora/integrations/torch.hpp"
#include "adalora/orthogonality.hpp"
#include "adalora/svd_adapter.hpp"

using adalora::torch_layout;

TEST_CASE("torch: views of contiguous CPU tensors share their memory", "[torch]") {
  auto t = torch::arange(12, torch::kFloat32).reshape({3, 4});
  const auto v = adalora::torch_matrix_view<float>(t, "t");
  REQUIRE(v.data() == t.data_ptr<float>());
  REQUIRE(v.rows() == 3);
  REQUIRE(v.cols() == 4);
  REQUIRE(v.row_stride() == 4);
  REQUIRE(v.col_stride() == 1);
  REQUIRE(v(2, 1) == 9.0f);
  v(2, 1) = -1.0f;  // a write through the view is a write to the tensor
  REQUIRE(t[2][1].item<float>() == -1.0f);

  auto d = torch::ones({2, 5}, torch::kFloat64);
  const auto dv = adalora::torch_matrix_view<const double>(d);
  REQUIRE(dv.data() == d.data_ptr<double>());

  // lora_E as PEFT stores it, (r, 1); also 1-D and a (1, r) row.
  auto e = torch::arange(5, torch::kFloat32).reshape({5, 1});
  const auto ev = adalora::torch_vector_view<float>(e, "lora_E");
  REQUIRE(ev.data() == e.data_ptr<float>());
  REQUIRE(ev.size() == 5);
  REQUIRE(ev[4] == 4.0f);
  REQUIRE(adalora::torch_vector_view<float>(e.view({5})).size() == 5);
  REQUIRE(adalora::torch_vector_view<float>(e.view({1, 5})).stride() == 1);
  // Rank 0 after resizing: (0, 1), (0, in), (out, 0) are fine.
  auto empty = torch::zeros({0, 1});
  REQUIRE(adalora::torch_vector_view<float>(empty).size() == 0);
  REQUIRE(adalora::torch_matrix_view<float>(torch::zeros({7, 0})).cols() == 0);
}

TEST_CASE("torch: strided tensors (transposes, slices, offsets) on request", "[torch]") {
  auto base = torch::arange(20, torch::kFloat32).reshape({4, 5});
  auto tt = base.t();  // 5 x 4, strides (1, 5)
  REQUIRE_THROWS_WITH(adalora::torch_matrix_view<float>(tt, "tt"),
                      Catch::Contains("torch_matrix_view") && Catch::Contains("tt must be contiguous") &&
                          Catch::Contains("[1, 5]") && Catch::Contains("torch_layout::strided"));
  const auto v = adalora::torch_matrix_view<float>(tt, "tt", torch_layout::strided);
  REQUIRE(v.data() == base.data_ptr<float>());
  REQUIRE(v.row_stride() == 1);
  REQUIRE(v.col_stride() == 5);
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 4; ++j) REQUIRE(v(i, j) == tt[i][j].item<float>());

  auto cols = base.slice(/*dim=*/1, 1, 4);  // 4 x 3, storage offset 1, strides (5, 1)
  const auto c = adalora::torch_matrix_view<float>(cols, "cols", torch_layout::strided);
  REQUIRE(c.data() == base.data_ptr<float>() + 1);
  REQUIRE(c(3, 2) == 18.0f);
  auto rows = base.narrow(0, 2, 2);  // contiguous, with a storage offset
  REQUIRE(adalora::torch_matrix_view<float>(rows).data() == base.data_ptr<float>() + 10);

  auto column = base.select(1, 2);  // 1-D, stride 5
  const auto cv = adalora::torch_vector_view<float>(column, "column", torch_layout::strided);
  REQUIRE(cv.stride() == 5);
  REQUIRE(cv[3] == 17.0f);

  // expand() makes elements share memory: fine to read, refused for writing.
  auto row = torch::arange(3, torch::kFloat32).reshape({1, 3});
  auto expanded = row.expand({4, 3});
  REQUIRE(adalora::torch_matrix_view<const float>(expanded, "x", torch_layout::strided).row_stride() == 0);
  REQUIRE_THROWS_WITH(adalora::torch_matrix_view<float>(expanded, "x", torch_layout::strided),
                      Catch::Contains("x has elements that share memory"));
  auto e = torch::zeros({1, 1}).expand({6, 1});
  REQUIRE_THROWS_WITH(adalora::torch_vector_view<float>(e, "lora_E", torch_layout::strided),
                      Catch::Contains("share memory"));
}

TEST_CASE("torch: tensors adalora cannot view are refused with a clear message", "[torch]") {
  auto f = torch::zeros({3, 4}, torch::kFloat32);
  auto d = torch::zeros({3, 4}, torch::kFloat64);
  REQUIRE_THROWS_WITH(adalora::torch_matrix_view<double>(f, "lora_A"),
                      Catch::Contains("adalora::torch_matrix_view") && Catch::Contains("lora_A") &&
                          Catch::Contains("dtype Double") && Catch::Contains("got Float"));
  REQUIRE_THROWS_WITH(adalora::torch_vector_view<float>(d.view({12}), "lora_E"),
                      Catch::Contains("torch_vector_view") && Catch::Contains("dtype Float") &&
                          Catch::Contains("got Double"));
  REQUIRE_THROWS_WITH(adalora::torch_matrix_view<float>(torch::zeros({2, 3, 4}), "w"),
                      Catch::Contains("w must be 2-D, got 3-D with shape (2, 3, 4)"));
  REQUIRE_THROWS_WITH(adalora::torch_matrix_view<float>(torch::zeros({4}), "w"),
                      Catch::Contains("must be 2-D, got 1-D with shape (4,)"));
  REQUIRE_THROWS_WITH(adalora::torch_vector_view<float>(torch::zeros({4, 2}), "lora_E"),
                      Catch::Contains("lora_E must be 1-D, or 2-D with one column or one row") &&
                          Catch::Contains("(4, 2)"));
  REQUIRE_THROWS_WITH(adalora::torch_matrix_view<float>(at::Tensor(), "lora_B"),
                      Catch::Contains("lora_B is an undefined tensor"));
  auto meta = torch::empty({2, 2}, torch::TensorOptions().device(torch::kMeta));
  REQUIRE_THROWS_WITH(adalora::torch_matrix_view<float>(meta, "lora_A"),
                      Catch::Contains("lora_A must be a CPU tensor") && Catch::Contains("meta"));
  auto sparse = torch::eye(3).to_sparse();
  REQUIRE_THROWS_WITH(adalora::torch_matrix_view<float>(sparse, "lora_A"),
                      Catch::Contains("must be a strided (dense) tensor") && Catch::Contains("Sparse"));
}

TEST_CASE("torch: an adapter's parameters and gradients, viewed for the allocator", "[torch]") {
  const int64_t r = 4, in = 6, out = 5;
  torch::manual_seed(1);
  auto A = (0.3 * torch::randn({r, in})).requires_grad_();
  auto E = torch::randn({r, 1}).requires_grad_();
  auto B = (0.3 * torch::randn({out, r})).requires_grad_();

  // Before backward() there are no gradients: a clear error, not a crash.
  REQUIRE_THROWS_WITH(adalora::torch_adapter_tensors<float>(A, E, B),
                      Catch::Contains("lora_A.grad() is an undefined tensor") &&
                          Catch::Contains("backward()"));

  // PEFT's SVDLinear forward in torch ops, with ranknum = r (docs/algorithm.md §2).
  auto x = torch::randn({3, in});
  const float alpha = 8.0f;
  auto ranknum = torch::full({1}, float(r));
  auto y = (x.mm((A * E).t()).mm(B.t())) * alpha / (ranknum + 1e-5);
  y.pow(2).sum().backward();

  const auto t = adalora::torch_adapter_tensors<float>(A, E, B);
  REQUIRE(t.params.A.data() == A.data_ptr<float>());
  REQUIRE(t.params.E.data() == E.data_ptr<float>());
  REQUIRE(t.params.B.data() == B.data_ptr<float>());
  REQUIRE(t.grads.A.data() == A.grad().data_ptr<float>());
  REQUIRE(t.grads.E.data() == E.grad().data_ptr<float>());
  REQUIRE(t.grads.B.data() == B.grad().data_ptr<float>());
  REQUIRE(t.params.rank() == r);
  REQUIRE(t.grads.E.size() == r);

  // adalora's forward over the same memory matches torch's.
  std::vector<float> ours(static_cast<std::size_t>(3 * out), 0.0f);
  adalora::adapter_workspace<float> ws;
  adalora::adapter_forward<float>(t.params, adalora::adapter_scale<float>(alpha, r),
                                  adalora::torch_matrix_view<const float>(x, "x"),
                                  adalora::make_matrix_view(ours.data(), 3, out), ws);
  auto yc = y.detach().contiguous();
  for (int64_t i = 0; i < 3 * out; ++i)
    REQUIRE(ours[std::size_t(i)] == Approx(yc.data_ptr<float>()[i]).epsilon(1e-5).margin(1e-7));

  // Masking through the view changes the parameter tensor in place.
  adalora::mask_singular_values(t.params.E, std::vector<bool>{true, false, true, false});
  REQUIRE(E[1][0].item<float>() == 0.0f);
  REQUIRE(E[0][0].item<float>() != 0.0f);

  // Shapes that do not fit together are refused.
  auto bad_B = torch::zeros({out, r + 1}, torch::requires_grad());
  REQUIRE_THROWS_WITH(adalora::torch_adapter_ref<float>(A, E, bad_B),
                      Catch::Contains("torch_adapter_ref") && Catch::Contains(".B must have E.size() = 4"));
}

TEST_CASE("torch: add_torch_adapter puts an adapter's tensors and gradients in a set", "[torch]") {
  const int64_t r = 3, in = 5, out = 4;
  torch::manual_seed(2);
  auto A = (0.3 * torch::randn({r, in})).requires_grad_();
  auto E = torch::randn({r, 1}).requires_grad_();
  auto B = (0.3 * torch::randn({out, r})).requires_grad_();
  adalora::adapter_set<float> set;

  // Before backward() there are no gradients: refused, naming the tensor, and nothing is added.
  REQUIRE_THROWS_WITH(adalora::add_torch_adapter(set, "q", A, E, B),
                      Catch::Contains("lora_A.grad() is an undefined tensor"));
  REQUIRE(set.empty());

  // Gradients made up front: the set views them from the start, and backward() accumulates into
  // the same memory, so the views made before the first step stay right.
  for (auto* p : {&A, &E, &B}) p->mutable_grad() = torch::zeros_like(*p);
  adalora::add_torch_adapter(set, "q", A, E, B);
  REQUIRE(set.size() == 1);
  REQUIRE(set.name(0) == "q");
  REQUIRE(set.shapes()[0].in_features == in);
  REQUIRE(set.shapes()[0].out_features == out);
  REQUIRE(set.shapes()[0].rank == r);
  REQUIRE(set.total_rank() == r);
  const auto p = set.params()[0];
  const auto g = set.grads()[0];
  REQUIRE(p.A.data() == A.data_ptr<float>());
  REQUIRE(p.E.data() == E.data_ptr<float>());
  REQUIRE(p.B.data() == B.data_ptr<float>());
  REQUIRE(g.A.data() == A.grad().data_ptr<float>());
  REQUIRE(g.E.data() == E.grad().data_ptr<float>());
  REQUIRE(g.B.data() == B.grad().data_ptr<float>());
  REQUIRE(set.tensors()[0].grads.B.data() == B.grad().data_ptr<float>());

  auto x = torch::randn({2, in});
  x.mm((A * E).t()).mm(B.t()).pow(2).sum().backward();
  REQUIRE(g.A.data() == A.grad().data_ptr<float>());  // in place: still the same tensor
  REQUIRE(g.B(out - 1, r - 1) == B.grad()[out - 1][r - 1].item<float>());
  REQUIRE(g.A(0, 0) != 0.0f);

  // The regularizer adds into the tensors' .grad() through the set.
  const auto before = A.grad().clone();
  adalora::orthogonality_regularizer<float> orth({.weight = 1.0});
  REQUIRE(orth.value_and_gradient(set) > 0.0f);
  REQUIRE_FALSE(torch::equal(before, A.grad()));

  // The set's rules hold: names are unique and not empty; dtypes must match the set's type.
  auto A2 = torch::zeros({r, in}, torch::requires_grad());
  auto E2 = torch::zeros({r, 1}, torch::requires_grad());
  auto B2 = torch::zeros({out, r}, torch::requires_grad());
  for (auto* q : {&A2, &E2, &B2}) q->mutable_grad() = torch::zeros_like(*q);
  REQUIRE_THROWS_WITH(adalora::add_torch_adapter(set, "q", A2, E2, B2),
                      Catch::Contains("'q' is already adapter 0's"));
  REQUIRE_THROWS_WITH(adalora::add_torch_adapter(set, "", A2, E2, B2),
                      Catch::Contains("needs a name"));
  adalora::adapter_set<double> doubles;
  REQUIRE_THROWS_WITH(adalora::add_torch_adapter(doubles, "q", A2, E2, B2),
                      Catch::Contains("lora_A must have dtype Double"));
  adalora::add_torch_adapter(set, "k", A2, E2, B2);
  REQUIRE(set.size() == 2);
  REQUIRE(set.total_rank() == 2 * r);
}
