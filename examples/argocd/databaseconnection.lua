-- Argo CD health of a pgwarden.io/v1alpha1 DatabaseConnection (Lua 5.1, as Argo CD runs it).
-- Healthy: Ready=True for the current generation and every proxy replica ready.
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
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the connection"
  return hs
end
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. generation
  return hs
end
local ready = condition(status, "Ready")
if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if ready.status ~= "True" then
  -- InvalidSpec names the field; the proxies keep their last valid configuration meanwhile
  hs.status = "Degraded"
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
  return hs
end
local wanted = 2 -- spec.proxy.replicas defaults to 2
if obj.spec ~= nil and obj.spec.proxy ~= nil and obj.spec.proxy.replicas ~= nil then
  wanted = obj.spec.proxy.replicas
end
local readyReplicas = status.readyReplicas or 0
if readyReplicas < wanted then
  hs.status = "Progressing"
  hs.message = "Proxies ready: " .. readyReplicas .. " of " .. wanted
  return hs
end
hs.status = "Healthy"
hs.message = "Proxies ready: " .. readyReplicas .. " of " .. wanted
if status.endpoint ~= nil then
  hs.message = hs.message .. ", endpoint " .. status.endpoint
end
return hs
