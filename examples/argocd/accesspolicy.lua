-- Argo CD health of a pgwarden.io/v1alpha1 AccessPolicy (Lua 5.1, as Argo CD runs it).
-- Healthy: Valid=True and ConnectionsResolved=True for the current generation.
local hs = {}
local function condition(status, type_)
  if status == nil or status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then return c end
  end
  return nil
end

local status = obj.status
local generation = obj.metadata.generation
if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration ~= generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to validate the policy"
  return hs
end
local valid = condition(status, "Valid")
local resolved = condition(status, "ConnectionsResolved")
if valid ~= nil and valid.status == "False" then
  hs.status = "Degraded"
  hs.message = "Invalid: " .. (valid.message or "")
  return hs
end
if valid == nil or valid.status ~= "True" or resolved == nil or resolved.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to validate the policy"
  return hs
end
if resolved.status == "True" then
  hs.status = "Healthy"
  hs.message = resolved.message or ""
  return hs
end
-- Selecting nothing (e.g. ["*"] before any connection exists) is waiting, not wrong; a named
-- connection that does not exist is a mistake to show (it clears once the connection appears).
if resolved.reason == "NoConnection" then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
hs.message = (resolved.reason or "") .. ": " .. (resolved.message or "")
return hs
