#pragma once
// The core of adalora in one include: adapters, their views and the named set of them, the
// orthogonality regularizer, importance metrics, budget schedules and the rank allocator, rank
// patterns and shard arithmetic. Standard library only. File formats (adalora/io/) and backend
// integrations (adalora/integrations/) are separate, opt-in targets with their own dependencies.

#include "adalora/adapter_set.hpp"
#include "adalora/adapter_shape.hpp"
#include "adalora/backend.hpp"
#include "adalora/budget_schedule.hpp"
#include "adalora/communicator.hpp"
#include "adalora/config.hpp"
#include "adalora/growth.hpp"
#include "adalora/growth_schedule.hpp"
#include "adalora/importance/magnitude.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/importance/sensitivity.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/orthogonality.hpp"
#include "adalora/rank_allocator.hpp"
#include "adalora/rank_change.hpp"
#include "adalora/rank_pattern.hpp"
#include "adalora/sharding.hpp"
#include "adalora/svd_adapter.hpp"
#include "adalora/svd_adapter_ref.hpp"
